"""AWQ (Lin et al. 2023), after llm-awq's auto_scale / auto_clip: protect the weight columns that meet
large activations by scaling them up before rounding.

Scale search, per LinearGroup with a producer to fold into (norm -> q/k/v, v -> o, norm -> gate/up,
up -> down; OPT: fc1 -> fc2): with m_j = mean |X_j| over calibration tokens and each ratio r in
{0, 1/n_grid, ..., (n_grid-1)/n_grid},

    s = m^r / sqrt(max(m^r) * min(m^r)),   loss(r) = mean (X W^T - (X / s) Q(W s)^T)^2

over the group's linears' outputs concatenated (W: their weights stacked; Q: the spec's RTN
fake-quantization). The best s is folded like SmoothQuant's (transforms.py). r = 0 is plain RTN, so
the chosen scale never does worse than RTN on this objective. Inputs come from the quantized stream
(x_q) through the float block; all groups are searched on the unscaled block, then folded together
(as llm-awq). The loss looks at the group's linears' outputs, not at the whole attention / MLP output
as llm-awq does for q/k/v and gate/up: cheaper, and needs no per-architecture sub-module calls.

Activation quantization (WxA<16) is allowed: then the search fake-quantizes the scaled inputs X / s
per token as well, so the scale also trades activation against weight error (like SmoothQuant, but
searched). The clip search always uses float inputs, as llm-awq.

Clip search (`clip`, llm-awq's auto_clip), after the scales are folded: per output channel and group,
shrink the weight's max |w| by factors 1 - i/n_grid (i < max_shrink * n_grid), clamp to
[-max, max], and keep the one with the least output error of that group's partial dot products on
`clip_tokens` tokens. Not for q/k, whose errors pass through the softmax.

This is the transform; the registered methods are `awq` (then round-to-nearest) and `awq+gptq`.
Calibration result: "smooth.<prev>" [prev out] scales and "clip.<linear>" [N, G] max |w|.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from abqllm.calib.runner import BlockContext
from abqllm.methods import transforms as T
from abqllm.quant import primitives as P
from abqllm.spec import ActSpec, WeightSpec

# ---- math ---------------------------------------------------------------------------------------


def awq_scales(x_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    s = x_mean.float().pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(x: torch.Tensor, w: torch.Tensor, x_mean: torch.Tensor, wspec: WeightSpec, aspec: ActSpec,
                 n_grid: int, head_dim: int) -> tuple[torch.Tensor, list[float]]:
    """Best scale (in x_mean's space: the producer's outputs) and the loss of every ratio.

    x [T, K] inputs, w [N, K] the group's weights stacked. With float activations the loss is computed
    as mean_n d_n^T (X^T X / T) d_n, d = Q(W s) / s - W: the same number from a K x K Gram matrix,
    cheaper than T tokens per ratio.
    """
    if aspec.is_float:
        gram = x.T @ x / x.shape[0]

        def loss_of(s_cols):
            d = P.fake_quant_weight(w * s_cols, wspec) / s_cols - w
            return ((d @ gram) * d).sum().item() / d.shape[0]
    else:
        ref = x @ w.T

        def loss_of(s_cols):
            xs = P.fake_quant_act(x / s_cols, aspec)
            return (xs @ P.fake_quant_weight(w * s_cols, wspec).T - ref).pow(2).mean().item()

    losses, best, best_loss = [], awq_scales(x_mean, 0.0), float("inf")
    for i in range(n_grid):
        s = awq_scales(x_mean, i / n_grid)
        loss = loss_of(T.expand_kv(s, w.shape[1], head_dim))
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = s, loss
    return best, losses


def search_clip(x: torch.Tensor, w: torch.Tensor, wspec: WeightSpec, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Max |w| per output channel and group [N, G] that minimizes the error of the group's partial outputs."""
    n, k = w.shape
    gs = wspec.group_size or k
    g = P.num_groups(k, wspec.group_size)
    pad = g * gs - k
    xg = F.pad(x.float(), (0, pad)).reshape(-1, g, gs)
    amax = P.group_minmax(w.abs().float(), wspec.group_size)[1]
    best = amax.clone()
    chunk = max(1, 2 ** 25 // (g * xg.shape[0]))  # output channels at a time: bounded memory
    for r0 in range(0, n, chunk):
        wc, am = w[r0:r0 + chunk].float(), amax[r0:r0 + chunk]
        ref = torch.einsum("tgk,ngk->ngt", xg, F.pad(wc, (0, pad)).reshape(-1, g, gs))
        best_err = torch.full_like(am, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            mv = am * (1 - i / n_grid)
            qw = P.fake_quant_weight(clip_weight(wc, mv, wspec.group_size), wspec)
            out = torch.einsum("tgk,ngk->ngt", xg, F.pad(qw, (0, pad)).reshape(-1, g, gs))
            err = (out - ref).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0:r0 + chunk] = torch.where(better, mv, best[r0:r0 + chunk])
    return best


def clip_weight(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    m = P.expand_groups(max_val.to(w.dtype), w.shape[1], group_size)
    return torch.maximum(torch.minimum(w, m), -m)


# ---- adapter ------------------------------------------------------------------------------------


class InputSample:
    """Forward pre-hooks keeping mean |x| per channel (all tokens) and every `stride`-th token row."""

    def __init__(self, stride: int):
        self.stride, self.abs_sum, self.count, self.rows = stride, {}, {}, {}

    def hook(self, name: str):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = x.abs().sum(0)
            self.abs_sum[name] = self.abs_sum[name] + s if name in self.abs_sum else s
            self.count[name] = self.count.get(name, 0) + x.shape[0]
            self.rows.setdefault(name, []).append(x[:: self.stride])
        return fn

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / self.count[name]

    def x(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows[name])


def collect_inputs(ctx: BlockContext, block: nn.Module, names: list[str], max_tokens: int) -> InputSample:
    tokens = ctx.x_q.shape[0] * ctx.x_q.shape[1]
    sample = InputSample(max(1, -(-tokens // max_tokens)))
    handles = [block.get_submodule(n).register_forward_pre_hook(sample.hook(n)) for n in names]
    try:
        ctx.run(block, ctx.x_q)
    finally:
        for h in handles:
            h.remove()
    return sample


@dataclass(frozen=True)
class AWQ:
    name: str = "awq"
    n_grid: int = 20
    search_tokens: int = 8192   # token rows (strided) for the scale search loss; the mean |x| uses all
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}

    @torch.no_grad()
    def search(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        arch, block = ctx.arch, ctx.block
        groups = [g for g in arch.groups if ctx.foldable(g) and set(g.linears) & set(ctx.linears)]
        hd = T.head_dim(block, arch)
        out: dict[str, torch.Tensor] = {}
        if groups:
            sample = collect_inputs(ctx, block, [g.linears[0] for g in groups], self.search_tokens)
            for g in groups:
                w = torch.cat([block.get_submodule(n).weight.detach().float() for n in g.linears])
                n_prev = block.get_submodule(g.prev).weight.shape[0]
                x_mean = T.reduce_kv(sample.mean_abs(g.linears[0]), n_prev, hd, "mean")
                s, _ = search_scale(sample.x(g.linears[0]), w, x_mean, ctx.spec.weight, ctx.spec.act,
                                    self.n_grid, hd)
                out[f"smooth.{g.prev}"] = s
        if self.clip:
            names = [n for n in ctx.linears if n not in (arch.q_proj, arch.k_proj)]
            work = copy.deepcopy(block)
            self.fold(work, ctx, out)
            sample = collect_inputs(ctx, work, names, self.clip_tokens)
            for n in names:
                out[f"clip.{n}"] = search_clip(sample.x(n), work.get_submodule(n).weight.detach(), ctx.spec.weight,
                                               self.clip_grid, self.max_shrink)
        return out

    @torch.no_grad()
    def fold(self, block: nn.Module, ctx: BlockContext, result: dict[str, torch.Tensor]) -> None:
        """Scales into the producers and consumers, then the clips into the (scaled) weights."""
        T.fold_scales(block, ctx.arch, {k[len("smooth."):]: v for k, v in result.items() if k.startswith("smooth.")})
        for key, max_val in result.items():
            if key.startswith("clip."):
                w = block.get_submodule(key[len("clip."):]).weight
                w.copy_(clip_weight(w, max_val.to(w.device), ctx.spec.weight.group_size))
