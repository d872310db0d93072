"""Calibration methods, by name. Each is a small frozen dataclass with the BlockContext adapter."""

from __future__ import annotations

from abqllm.errors import AbqError
from abqllm.methods.abq import ABQ
from abqllm.methods.compose import composed
from abqllm.methods.gptq import GPTQ
from abqllm.methods.rtn import RTN

METHODS = {"abq": ABQ, "rtn": RTN,
           "gptq": GPTQ,
           "smoothquant": composed("smoothquant"),
           "smoothquant+gptq": composed("smoothquant+gptq"),
           "awq": composed("awq"),
           "awq+gptq": composed("awq+gptq"),
           "abq+gptq": composed("abq+gptq")}


def get_method(name: str, **options):
    cls = METHODS.get(name)
    if cls is None:
        raise AbqError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    try:
        return cls(**options)
    except TypeError as e:
        raise AbqError(f"bad option for method {name}: {e}") from None


DEFAULT_CALIB = (32, 512)  # (windows, tokens) for methods without presets: minutes on 2 CPU cores


def resolve_preset(name: str, preset: str | None, device_type: str) -> tuple[dict, tuple[int, int], str | None]:
    """(method options, (calibration windows, tokens), preset used) for a method on a device.

    Methods with presets (abq) use "cpu" on a CPU and "paper" on a GPU unless one is named.
    """
    presets = getattr(METHODS.get(name), "presets", {})
    if not presets:
        if preset is not None:
            raise AbqError(f"method {name} has no presets; drop --preset")
        return {}, DEFAULT_CALIB, None
    preset = preset or ("cpu" if device_type == "cpu" else "paper")
    if preset not in presets:
        raise AbqError(f"unknown preset {preset!r} for {name}; choose one of {', '.join(presets)}")
    options, data = presets[preset]
    return dict(options), data, preset
