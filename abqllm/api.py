"""The public Python API; the CLI calls exactly these.

    import abqllm
    model, tok = abqllm.load_model("smollm2-135m")
    report = abqllm.quantize(model, "W4A8", method="rtn")             # in place
    abqllm.save_quantized(model, tok, "out/w4a8")
    model, tok = abqllm.load_model("out/w4a8")
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from abqllm import __version__
from abqllm.calib.artifacts import ArtifactStore
from abqllm.calib.runner import BlockReport, quantize_blocks
from abqllm.errors import AbqError
from abqllm.io.checkpoint import CHECKPOINT_VERSION, QUANT_METHOD, load_quantized
from abqllm.methods import get_method
from abqllm.methods.rotation import rotate_model
from abqllm.models.hub import is_quantized_checkpoint, load_float_model
from abqllm.nn.qlinear import QuantLinear
from abqllm.quant.hadamard import install_on_blocks
from abqllm.spec import QuantSpec, parse_scheme


@dataclass
class QuantizeReport:
    spec: str
    method: str
    seconds: float
    layers: int
    blocks: list[BlockReport] = field(default_factory=list)


def quantize(model: nn.Module, spec: QuantSpec | str, method: str = "rtn", calib_ids: torch.Tensor | None = None,
             device: str | torch.device | None = None, data: str | None = None, seed: int = 0,
             progress: bool = True, artifacts: str | Path | None = None, **method_options) -> QuantizeReport:
    """Quantize every linear inside the decoder blocks of `model` in place (lm_head is skipped by default).

    The output layer is quantized with round-to-nearest, whatever `method` is, when `spec.lm_head`
    gives it a scheme (that scheme, even if `spec.skip` names it) or when `spec.skip` does not name it
    (the body's scheme); a tied one is untied from the embedding, which stays float.

    `calib_ids` [n, L] token windows are needed by methods that calibrate (and by static activation
    scales); `data` and `seed` describe them in the checkpoint. `artifacts`: a folder where each
    block's calibration result is kept; blocks already there are re-applied, not recalibrated
    (resume after an interruption, or re-apply a finished calibration).
    """
    if isinstance(spec, str):
        spec = parse_scheme(spec)
    if getattr(model.config, "quantization_config", None) is not None or any(
            isinstance(mod, QuantLinear) for mod in model.modules()):  # any library's config, or our layers
        raise AbqError("model is already quantized; load the float model to quantize it again")
    m = get_method(method, **method_options)
    _head_layer(model, spec)  # a head scheme that cannot work is refused before any calibration
    store = None
    if artifacts is not None:
        store = ArtifactStore(artifacts, {
            # Without the head's scheme: it is RTN after the blocks, so their calibration serves any head.
            "model": getattr(model.config, "_name_or_path", None),
            "spec": {k: v for k, v in spec.to_dict().items() if k != "lm_head"}, "method": m.name,
            "method_settings": m.settings(), "data": data, "seed": seed,
            "calib_shape": list(calib_ids.shape) if calib_ids is not None else None,
            "calib_sha256": _tensor_digest(calib_ids)})
    t0 = time.perf_counter()
    if spec.rotate:
        rotate_model(model, seed)
    if spec.hadamard:  # after any residual rotation: W -> Q^T W H acts on both sides of a weight, in either order
        install_on_blocks(model, spec.hadamard, spec.is_skipped, spec.hadamard_layers)
    with _attention_probabilities(model, getattr(m, "needs_attention_maps", False)):
        layers, blocks = quantize_blocks(model, spec, m, calib_ids, device, progress=progress, store=store,
                                         seed=seed)
    layers.update(_quantize_lm_head(model, spec))
    seconds = time.perf_counter() - t0
    model.config.quantization_config = {
        "quant_method": QUANT_METHOD, "format_version": CHECKPOINT_VERSION, "abqllm_version": __version__,
        "spec": spec.to_dict(), "layers": layers, "method": m.name, "method_settings": m.settings(),
        "data": data, "calib_shape": list(calib_ids.shape) if calib_ids is not None else None, "seed": seed,
    }
    return QuantizeReport(spec.name, m.name, seconds, len(layers), blocks)


@contextlib.contextmanager
def _attention_probabilities(model: nn.Module, needed: bool):
    """Eager attention while a method needs attention maps (SDPA does not return them)."""
    before = getattr(model.config, "_attn_implementation", None)
    if not needed or before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _tensor_digest(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()


def _head_layer(model: nn.Module, spec: QuantSpec):
    """(module name, LayerSpec or None) of the output layer under `spec`; refuses static activations."""
    from abqllm.models.arch import arch_for

    name = arch_for(model.config).lm_head
    return name, spec.head_layer(name)


def _quantize_lm_head(model: nn.Module, spec: QuantSpec) -> dict[str, dict]:
    """Round-to-nearest for the output layer, with spec.lm_head or (taken out of --skip) the body's scheme.

    A tied lm_head is untied: the embedding stays float, the output layer gets its own codes.
    The returned per-layer entry is the head's own LayerSpec, which the loaders rebuild it from.
    """
    name, layer = _head_layer(model, spec)
    if layer is None:
        return {}
    model.set_submodule(name, QuantLinear.from_float(model.get_submodule(name), layer))
    model.config.tie_word_embeddings = False
    return {name: layer.to_dict()}


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa"):
    """(model, tokenizer) from the built-in default name, a local folder (float or abqllm) or a hub id."""
    if Path(name_or_path).is_dir() and is_quantized_checkpoint(name_or_path):
        return load_quantized(name_or_path, dtype=dtype, device=device)
    return load_float_model(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all distinct parameters and persistent buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32, chat: bool = False, engine: str = "auto",
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
    """Continuation of `prompt` (or of a one-turn chat when chat=True); greedy unless temperature > 0.

    engine: "fast" = the native C++ decode step with a static KV cache (abqllm/runtime/cpu_decode.py, Llama-like
    models; agrees with the model to float rounding), "exact" = the same step bit-identical to the model's own
    forward, "python" = that step as torch ops from Python, "hf" = model.generate, "auto" = fast on CPU where
    the model supports it, else hf.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    n = enc["input_ids"].shape[1]
    if _fast_engine(model, engine, n + max_new_tokens):
        from abqllm.runtime.cpu_decode import decoder_for

        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
        res = decoder_for(model, "fast" if engine == "auto" else engine, n + max_new_tokens).generate(
            enc["input_ids"][0], max_new_tokens, eos_token_id=eos, do_sample=temperature > 0,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return tokenizer.decode(res.tokens, skip_special_tokens=True)
    sampling = {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, n:], skip_special_tokens=True)


def _fast_engine(model, engine: str, max_len: int) -> bool:
    from abqllm.runtime.cpu_decode import supports

    if engine not in ("auto", "fast", "exact", "python", "hf"):
        raise AbqError(f"unknown engine {engine!r}; choose auto, fast, exact, python or hf")
    if engine == "hf":
        return False
    if engine != "auto":
        return True  # CpuDecoder names the problem if the model does not fit
    return next(model.parameters()).device.type == "cpu" and supports(model, max_len) is None
