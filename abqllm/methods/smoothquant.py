"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights with one scale per input channel,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),

X_j the j-th input channel of a LinearGroup over the float stream's calibration tokens, W_j the j-th
column of all the group's linears together. The producer (a norm) is divided by s and the linears'
columns multiplied by s (transforms.py), so the float block is unchanged while the linears' inputs
are flatter. By default only norm-fed groups are smoothed, as in the paper; `linear_prevs` also
smooths v -> o and up -> down (OPT: fc1 -> fc2).

This is the transform; the registered methods are `smoothquant` (then round-to-nearest) and
`smoothquant+gptq` (then GPTQ), see compose.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from abqllm.calib.runner import BlockContext
from abqllm.methods import transforms as T
from abqllm.models.arch import ArchSpec

EPS = 1e-5


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel scale; zero statistics (dead channels) give finite, positive scales."""
    x = x_absmax.float().clamp(min=EPS)
    w = w_absmax.float().clamp(min=EPS)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=EPS)


def input_absmax(ctx: BlockContext, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """max |input| per channel of the named linears of ctx.block when `x` runs through it."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        return fn

    handles = [ctx.block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        ctx.run(ctx.block, x)
    finally:
        for h in handles:
            h.remove()
    return stats


def smoothed_groups(arch: ArchSpec, quantized: set[str], linear_prevs: bool):
    """Groups with a producer to fold into and at least one quantized linear."""
    return [g for g in arch.groups if g.prev is not None and set(g.linears) & quantized
            and (linear_prevs or T.is_norm_group(arch, g))]


@dataclass(frozen=True)
class SmoothQuant:
    name: str = "smoothquant"
    alpha: float = 0.5
    linear_prevs: bool = False

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}

    @torch.no_grad()
    def search(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        """{"smooth.<prev>": s} from the float stream; the block is not changed."""
        groups = [g for g in smoothed_groups(ctx.arch, set(ctx.linears), self.linear_prevs) if ctx.foldable(g)]
        if not groups:
            return {}
        stats = input_absmax(ctx, [g.linears[0] for g in groups], ctx.x_fp)
        hd = T.head_dim(ctx.block, ctx.arch)
        out = {}
        for g in groups:
            n_prev = ctx.block.get_submodule(g.prev).weight.shape[0]
            w = torch.cat([ctx.block.get_submodule(n).weight.detach().float() for n in g.linears])
            x_max = T.reduce_kv(stats[g.linears[0]], n_prev, hd, "max")
            w_max = T.reduce_kv(w.abs().amax(0), n_prev, hd, "max")
            out[f"smooth.{g.prev}"] = smooth_scales(x_max, w_max, self.alpha)
        return out

    def fold(self, block: nn.Module, ctx: BlockContext, result: dict[str, torch.Tensor]) -> None:
        T.fold_scales(block, ctx.arch, {k[len("smooth."):]: v for k, v in result.items() if k.startswith("smooth.")})
