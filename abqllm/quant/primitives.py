"""Quantization primitives in pure torch: the numerical ground truth every other stage is tested against.

Conventions (see abqllm/spec.py): codes are unsigned integers u in [0, qmax], W = s * (u - z).
Weights are [N, K] (out, in); groups run along K. A layer whose K is not a multiple of the group
size gets a shorter last group: qparams are computed over the real columns only.
Scales are rounded to float16 once, here, so the codes are chosen against exactly the scale that
is stored and used by every kernel.
"""

from __future__ import annotations

import math

import torch

from abqllm.spec import ActSpec, WeightSpec

# Smallest normal float16: below it stored scales would lose relative precision.
MIN_WEIGHT_SCALE = 2.0 ** -14
MIN_ACT_SCALE = 1e-8


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == 0 else math.ceil(k / group_size)


def group_bounds(k: int, group_size: int) -> list[tuple[int, int]]:
    gs = k if group_size == 0 else group_size
    return [(s, min(s + gs, k)) for s in range(0, k, gs)]


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] per-column values."""
    if group_size == 0:
        return t.expand(t.shape[0], k) if t.shape[1] == 1 else t
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def group_minmax(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of [N, K] -> two [N, G] tensors (padding never counts)."""
    n, k = w.shape
    if group_size == 0:
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    g = num_groups(k, group_size)
    pad = g * group_size - k
    # Replicating the last real column keeps the last group's min/max unchanged.
    wp = torch.nn.functional.pad(w, (0, pad), mode="replicate") if pad else w
    wp = wp.reshape(n, g, group_size)
    return wp.amin(-1), wp.amax(-1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, gradient passed straight through."""
    return x + (torch.round(x) - x).detach()


def weight_qparams(w: torch.Tensor, spec: WeightSpec, lo: torch.Tensor | None = None,
                   hi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale [N, G] (float32 holding float16-representable values) and zero point [N, G] (float32 integers).

    lo/hi override the per-group range (learnable clipping passes them in); they must keep
    gradients, so this function is differentiable in lo and hi (rounding via STE).
    """
    if lo is None or hi is None:
        gmin, gmax = group_minmax(w.detach().float(), spec.group_size)
        lo = gmin if lo is None else lo
        hi = gmax if hi is None else hi
    lo = torch.clamp(lo.float(), max=0.0)  # zero must be representable (exact zeros, padding)
    hi = torch.clamp(hi.float(), min=0.0)
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        levels = half if spec.balanced else half - 1
        scale = torch.maximum(hi, -lo) / levels
        zero = torch.full_like(scale, float(half)).detach()
    else:
        scale = (hi - lo) / spec.qmax
    scale = _to_fp16_grid(scale.clamp(min=MIN_WEIGHT_SCALE))
    if not spec.symmetric:
        zero = torch.clamp(round_ste(-lo / scale), 0, spec.qmax)
    return scale, zero


def _to_fp16_grid(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value, keep dtype and gradient (STE)."""
    return x + (x.detach().half().float() - x.detach())


def quantize_weight(w: torch.Tensor, spec: WeightSpec, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integer codes (uint8) of w [N, K] for given per-group scale/zero [N, G]."""
    k = w.shape[1]
    s = expand_groups(scale.detach().float(), k, spec.group_size)
    z = expand_groups(zero.detach().float(), k, spec.group_size)
    return torch.clamp(torch.round(w.detach().float() / s) + z, 0, spec.qmax).to(torch.uint8)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    k = codes.shape[1]
    s = expand_groups(scale.float(), k, group_size)
    z = expand_groups(zero.float(), k, group_size)
    return ((codes.float() - z) * s).to(dtype)


def fake_quant_weight(w: torch.Tensor, spec: WeightSpec, lo: torch.Tensor | None = None,
                      hi: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize with straight-through rounding: differentiable in w, lo and hi."""
    scale, zero = weight_qparams(w, spec, lo, hi)
    k = w.shape[1]
    s = expand_groups(scale, k, spec.group_size)
    z = expand_groups(zero, k, spec.group_size)
    q = torch.clamp(round_ste(w / s) + z, 0, spec.qmax)
    return (q - z) * s


# ---- activations --------------------------------------------------------------------------------

def act_qparams(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim reduced) scale and zero point, float32, shapes [..., 1]."""
    xf = x.detach().float()
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        scale = (xf.abs().amax(-1, keepdim=True) / (half - 1)).clamp(min=MIN_ACT_SCALE)
        return scale, torch.full_like(scale, float(half))
    lo = xf.amin(-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / spec.qmax).clamp(min=MIN_ACT_SCALE)
    return scale, torch.round(-lo / scale)


def static_act_qparams(lo: float, hi: float, spec: ActSpec) -> tuple[float, float]:
    """One scale/zero for a whole tensor from an observed range (static per-tensor activations)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        return max(max(hi, -lo) / (half - 1), MIN_ACT_SCALE), float(half)
    scale = max((hi - lo) / spec.qmax, MIN_ACT_SCALE)
    return scale, float(round(-lo / scale))


def quantize_act(x: torch.Tensor, spec: ActSpec, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes as float32 integers in [0, qmax] (kept float: they feed float64/float32 matmuls)."""
    return torch.clamp(torch.round(x.float() / scale) + zero, 0, spec.qmax)


def fake_quant_act(x: torch.Tensor, spec: ActSpec, scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations (per token unless a static scale/zero is given); STE rounding."""
    if spec.is_float:
        return x
    if scale is None:
        scale, zero = act_qparams(x, spec)
    q = torch.clamp(round_ste(x.float() / scale) + zero, 0, spec.qmax)
    return ((q - zero) * scale).to(x.dtype)
