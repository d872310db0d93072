"""Equivalent per-channel scalings, folded into a block's float weights (SmoothQuant, AWQ).

A LinearGroup's input X is produced by its `prev`. Dividing the producer's output channels by s and
multiplying the consumers' input columns by s leaves the block's function unchanged:
- norm -> linears:   norm weight w / s; a LayerNorm's bias b / s too; Gemma's norms compute
                     norm(x) * (1 + w), so there w' = (1 + w) / s - 1;
- linear -> linears: the producer's rows (and bias) / s. Exact for v -> o (attention is linear in v),
                     up -> down (act(gate) * up is linear in up) and OPT's fc1 -> ReLU -> fc2 (ReLU is
                     positively homogeneous; every s here is > 0).
A scale always lives in the producer's output space. With grouped-query attention v_proj has
kv_heads * head_dim outputs and o_proj reads heads * head_dim columns: the scale of one v channel is
repeated over the query heads that share its kv head (`expand_kv`); statistics measured on o_proj's
columns are reduced the other way (`reduce_kv`).

The math is pure functions on tensors; `fold_scales` is the adapter that writes into a block.
"""

from __future__ import annotations

import torch
from torch import nn

from abqllm.models.arch import ArchSpec, LinearGroup, attention_dims


def divide_norm(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
                plus_one: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Norm parameters whose output is the old output / s (computed in float64)."""
    w, s = weight.double(), s.double()
    w = (1 + w) / s - 1 if plus_one else w / s
    return w.to(weight.dtype), None if bias is None else (bias.double() / s).to(bias.dtype)


def divide_rows(weight: torch.Tensor, bias: torch.Tensor | None,
                s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear [N, K] (and bias [N]) whose output is the old output / s [N]."""
    s = s.double()
    w = (weight.double() / s[:, None]).to(weight.dtype)
    return w, None if bias is None else (bias.double() / s).to(bias.dtype)


def multiply_columns(weight: torch.Tensor, s_cols: torch.Tensor) -> torch.Tensor:
    """Linear [N, K] reading inputs / s: its columns * s [K]."""
    return (weight.double() * s_cols.double()).to(weight.dtype)


def expand_kv(s: torch.Tensor, n_cols: int, head_dim: int) -> torch.Tensor:
    """Scale in the producer's space -> the consumer's columns; identity unless v -> o under GQA.

    o_proj's column (h * head_dim + d) reads v channel ((h // rep) * head_dim + d), rep = heads / kv_heads
    (transformers' repeat_kv repeats each kv head `rep` times in a row).
    """
    if s.numel() == n_cols:
        return s
    kv = s.numel() // head_dim
    return s.reshape(kv, 1, head_dim).expand(kv, n_cols // s.numel(), head_dim).reshape(-1)


def reduce_kv(t: torch.Tensor, n_prev: int, head_dim: int, how: str = "max") -> torch.Tensor:
    """Per-column statistic of the consumer [n_cols] -> the producer's space [n_prev] (max or mean)."""
    if t.numel() == n_prev:
        return t
    kv = n_prev // head_dim
    t = t.reshape(kv, t.numel() // n_prev, head_dim)
    return (t.amax(1) if how == "max" else t.mean(1)).reshape(-1)


def fold_group(weights: dict[str, torch.Tensor], group: LinearGroup, s: torch.Tensor, plus_one: bool,
               head_dim: int) -> dict[str, torch.Tensor]:
    """Named block tensors (as block.named_parameters()) -> the tensors that change when `s` is folded.

    `prev` is a norm when its weight is 1-D, a linear when 2-D.
    """
    pw, pb = f"{group.prev}.weight", f"{group.prev}.bias"
    out: dict[str, torch.Tensor] = {}
    if weights[pw].dim() == 1:
        w, b = divide_norm(weights[pw], weights.get(pb), s, plus_one)
    else:
        w, b = divide_rows(weights[pw], weights.get(pb), s)
    out[pw] = w
    if b is not None:
        out[pb] = b
    for name in group.linears:
        wl = weights[f"{name}.weight"]
        out[f"{name}.weight"] = multiply_columns(wl, expand_kv(s, wl.shape[1], head_dim))
    return out


def group_for(arch: ArchSpec, prev: str) -> LinearGroup:
    return next(g for g in arch.groups if g.prev == prev)


def head_dim(block: nn.Module, arch: ArchSpec) -> int:
    return attention_dims(block.get_submodule(arch.attn).config)[2]


def is_norm_group(arch: ArchSpec, group: LinearGroup) -> bool:
    return group.prev is not None and group.prev not in arch.linear_names


@torch.no_grad()
def fold_scales(block: nn.Module, arch: ArchSpec, scales: dict[str, torch.Tensor]) -> None:
    """Fold {prev name: s} into `block` in place, group by group in the order given."""
    hd = head_dim(block, arch)
    for prev, s in scales.items():
        params = dict(block.named_parameters())
        for name, t in fold_group(params, group_for(arch, prev), s.to(params[f"{prev}.weight"].device),
                                  arch.norm_plus_one, hd).items():
            params[name].copy_(t)
