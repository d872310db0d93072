"""Quantized checkpoints: a Hugging Face model folder (config.json, tokenizer, model.safetensors) whose
config.json carries a `quantization_config` block:

    {"quant_method": "abqllm", "format_version": 1,
     "spec": {...QuantSpec...}, "layers": {"model.layers.0.self_attn.q_proj": {...LayerSpec...}, ...},
     "method": "rtn", "method_settings": {...}, "data": "...", "seed": 0, "abqllm_version": "0.1.0",
     "files": {"model.safetensors": {"bytes": N, "sha256": "..."}}}

Writes are atomic: everything goes into a hidden temporary folder beside the target, which is
renamed into place only when complete, so a crash or Ctrl-C never leaves a folder that looks valid.
Loading checks the format version, the size and sha256 of every tensor file, and that the tensors
match the layers the config describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from abqllm.errors import AbqError
from abqllm.nn.qlinear import QuantLinear
from abqllm.spec import LayerSpec, QuantSpec

QUANT_METHOD = "abqllm"
CHECKPOINT_VERSION = 1
WEIGHTS = "model.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless overwrite: call this before any long work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise AbqError(f"output folder {out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise AbqError(f"output path {out} is a file, not a folder; choose another --out")
    return out


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without aliases (tied embeddings): safetensors refuses shared storage."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield an empty hidden folder beside `out`; when the block ends normally it becomes `out`.

    An existing `out` is refused unless overwrite, and is replaced only after the new folder is
    complete: an exception or Ctrl-C inside the block removes the temporary folder and leaves `out`
    as it was. Write config.json last, so that a folder without it is never taken for a model.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_quantized(model: nn.Module, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Write `model` (quantized in place by abqllm.quantize) to `out` atomically."""
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise AbqError("model is not quantized by abqllm (no quantization_config); run abqllm.quantize first")
    with atomic_dir(out, overwrite) as tmp:
        save_file(_unique_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt", "quant_method": QUANT_METHOD})
        files = {WEIGHTS: {"bytes": (tmp / WEIGHTS).stat().st_size, "sha256": sha256_file(tmp / WEIGHTS)}}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        config = model.config.to_dict()
        if config.get("dtype") is None:  # else from_pretrained(dtype="auto") takes the first float tensor's (scales)
            config["dtype"] = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).split(".")[-1]
        config["quantization_config"] = {**qc, "files": files}
        # config.json last: a folder without it is never taken for a model.
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return Path(out)


def read_quantization_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AbqError(f"{folder}/config.json cannot be read ({e}); the checkpoint is damaged, re-save it") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise AbqError(f"{folder} is not an abqllm checkpoint (config.json has no abqllm quantization_config)")
    if qc.get("format_version") != CHECKPOINT_VERSION:
        raise AbqError(f"{folder} has checkpoint format version {qc.get('format_version')!r}; this abqllm reads "
                       f"version {CHECKPOINT_VERSION}: upgrade abqllm or re-quantize")
    return qc


def verify_files(folder: Path, qc: dict) -> None:
    files = qc.get("files") or {}
    if WEIGHTS not in files:
        raise AbqError(f"{folder}: quantization_config lists no tensor files; the checkpoint is damaged, re-save it")
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise AbqError(f"{folder}: {name} is missing; the checkpoint is incomplete, re-save it")
        size = path.stat().st_size
        if size != meta.get("bytes"):
            raise AbqError(f"{folder}: {name} has {size} bytes, expected {meta.get('bytes')} (truncated or "
                           "edited); re-save the checkpoint")
        if sha256_file(path) != meta.get("sha256"):
            raise AbqError(f"{folder}: {name} does not match its recorded sha256 (edited or corrupt); "
                           "re-save the checkpoint")


def _build_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    qc = config.quantization_config
    del config.quantization_config  # the float skeleton must not go through transformers' quantizers
    # Parameters on the meta device (no memory); buffers such as rotary frequencies stay real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.quantization_config = qc
    return model


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load an abqllm checkpoint folder -> (model, tokenizer). Refuses damaged checkpoints."""
    from transformers import AutoTokenizer

    from abqllm.models.arch import arch_for

    folder = Path(folder)
    qc = read_quantization_config(folder)
    QuantSpec.from_dict(qc.get("spec", {}))  # refuses unknown spec versions
    verify_files(folder, qc)
    model = _build_skeleton(folder, dtype)
    arch_for(model.config)
    for name, layer_dict in qc.get("layers", {}).items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise AbqError(f"{folder}: layer {name} in quantization_config does not exist in the model") from None
        with torch.device("meta"):  # no zero-filled buffers: the checkpoint's tensors are assigned below
            q = QuantLinear(lin.in_features, lin.out_features, LayerSpec.from_dict(layer_dict),
                            bias=lin.bias is not None, dtype=dtype)
        model.set_submodule(name, q)
    try:
        state = load_file(folder / WEIGHTS)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise AbqError(f"{folder}/{WEIGHTS} cannot be read ({e}); re-save the checkpoint") from None
    expected = model.state_dict()
    for name, t in state.items():
        if name not in expected:
            raise AbqError(f"{folder}: tensor {name} does not belong to this model; the checkpoint is inconsistent")
        if tuple(t.shape) != tuple(expected[name].shape) or t.dtype != expected[name].dtype:
            raise AbqError(f"{folder}: tensor {name} has shape {tuple(t.shape)} {t.dtype}, expected "
                           f"{tuple(expected[name].shape)} {expected[name].dtype}; the checkpoint is inconsistent")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise AbqError(f"{folder}: tensors missing from {WEIGHTS}: {missing[:3]}...; the checkpoint is incomplete")
    model.eval().to(device)
    if torch.device(device).type == "cuda":  # weights held once where this GPU's dispatch table allows it
        from abqllm.kernels.kpacked_linear import settle_layouts
        settle_layouts(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
