"""One registry of implementations per op.

An implementation registers the op it serves, a name, a priority and a `supports(layer, device)`
predicate. The choice is explicit: a layer asks for `auto` (highest-priority implementation that
supports it, or on a GPU with a measured dispatch table the fastest one there: kernels/dispatch_table.py) or a name
(`reference`, `torch`, `triton`, `cuda`, ...), and a named choice that cannot serve the layer is an error, never a
silent fallback. Each choice is logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from abqllm.errors import AbqError

log = logging.getLogger("abqllm.kernels")


@dataclass(frozen=True)
class Kernel:
    op: str
    name: str
    fn: Callable
    supports: Callable[[object, torch.device], bool]
    priority: int
    layout: str = "bitstream"  # the weight layout it reads: the checkpoint's 'bitstream' (qweight) or 'kpacked'


_REGISTRY: dict[str, dict[str, Kernel]] = {}
_LOGGED: set[tuple[str, str, str]] = set()


def register(op: str, name: str, *, priority: int = 0,
             supports: Callable[[object, torch.device], bool] = lambda layer, device: True,
             layout: str = "bitstream"):
    def deco(fn):
        _REGISTRY.setdefault(op, {})[name] = Kernel(op, name, fn, supports, priority, layout)
        return fn
    return deco


def available(op: str) -> list[str]:
    return sorted(_REGISTRY.get(op, {}), key=lambda n: -_REGISTRY[op][n].priority)


def bitstream_elsewhere(layer, device: torch.device) -> bool:
    """True when the layer holds its weights on `device` only in the k-packed layout, its checkpoint bitstream
    (qweight) having been moved off it (kpacked_linear.keep_only_kpacked / settle_layouts): then only kernels that
    read the k-packed layout can serve it there."""
    q = getattr(layer, "qweight", None)
    if q is None or getattr(layer, "_kernel_cache", {}).get("kpacked") is None:
        return False
    return not (q.device.type == device.type and (device.index is None or q.device.index in (None, device.index)))


def _serves(k: Kernel, layer, device: torch.device) -> bool:
    return k.supports(layer, device) and not (k.layout == "bitstream" and bitstream_elsewhere(layer, device))


def supporting(op: str, layer, device: torch.device) -> list[str]:
    """Names of the implementations that serve this layer on `device`, highest priority first."""
    return [name for name in available(op) if _serves(_REGISTRY[op][name], layer, device)]


def layout(op: str, name: str) -> str:
    return _REGISTRY[op][name].layout


def select(op: str, preference: str, layer, device: torch.device, rows: int | None = None) -> Kernel:
    """`rows`: the input's rows (M), when known: on a GPU with a measured dispatch table (dispatch_table.py), `auto`
    takes the kernel that table found fastest for the layer's scheme at that many rows."""
    impls = _REGISTRY.get(op, {})
    if preference == "auto":
        usable = [k for k in impls.values() if _serves(k, layer, device)]
        if not usable:
            raise AbqError(f"no {op} kernel supports this layer on {device}; available: {available(op)}")
        kernel = max(usable, key=lambda k: k.priority)
        if op == "linear" and rows is not None and device.type == "cuda":
            from abqllm.kernels import dispatch_table
            measured = impls.get(dispatch_table.choose(layer, device, rows) or "")
            if measured is not None and measured in usable:
                kernel = measured
    else:
        kernel = impls.get(preference)
        if kernel is None:
            raise AbqError(f"unknown {op} kernel {preference!r}; choose auto or one of {available(op)}")
        if not kernel.supports(layer, device):
            raise AbqError(f"{op} kernel {preference!r} does not support this layer on {device}; use auto")
        if kernel.layout == "bitstream" and bitstream_elsewhere(layer, device):
            raise AbqError(f"{op} kernel {preference!r} reads the checkpoint layout (qweight), which this layer no "
                           f"longer holds on {device} (its weights are there in the k-packed layout only); use auto "
                           f"or one of {[n for n in available(op) if _REGISTRY[op][n].layout == 'kpacked']}")
    key = (op, kernel.name, device.type)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("%s on %s: using the %r kernel (asked for %r)", op, device.type, kernel.name, preference)
    return kernel
