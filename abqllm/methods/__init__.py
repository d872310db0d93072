"""Calibration methods, by name. Each is a small frozen dataclass with the BlockContext adapter."""

from __future__ import annotations

from abqllm.errors import AbqError
from abqllm.methods.rtn import RTN

METHODS = {"rtn": RTN}


def get_method(name: str, **options):
    cls = METHODS.get(name)
    if cls is None:
        raise AbqError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    try:
        return cls(**options)
    except TypeError as e:
        raise AbqError(f"bad option for method {name}: {e}") from None
