"""ABQ calibration (ABQ.md sections 2-4): learnable equivalent transforms, learnable weight clipping
and distribution compensation, trained block by block against the float block's outputs on both
streams with MSE, cosine (distribution correction) and attention-map KL terms; then folded.

The math lives in abq_math.py; this file adapts it to the block runner.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from abqllm.calib.runner import BlockContext
from abqllm.errors import AbqError
from abqllm.methods import abq_math as M
from abqllm.methods.awq import AWQ
from abqllm.methods.transforms import reduce_kv
from abqllm.models.arch import attention_dims
from abqllm.nn.qlinear import QuantLinear
from abqllm.quant import primitives as P
from abqllm.spec import QuantSpec

log = logging.getLogger(__name__)

# name -> (options, (calibration windows, tokens per window)). Costs are in the README; "cpu"
# finishes the default model in minutes on 2 cores, "cpu-large" in about 4x that, "paper" is the
# ABQ-LLM recipe (20 or 40 epochs).
_CPU_RECIPE = dict(epochs=1, batch_size=4, lr_smooth=1e-2, lr_clip=2e-2)
PRESETS = {
    "cpu": (_CPU_RECIPE, (16, 256)),
    # the cpu recipe on 4x the calibration tokens: about 4x the time, clearly better weights
    # (abq+gptq W4A16g64 23.63 -> 22.55, W4A16 26.46 -> 24.48; README "Measured")
    "cpu-large": (_CPU_RECIPE, (64, 256)),
    "paper": (dict(epochs=20, lr_smooth=5e-3, lr_clip=1e-2), (128, 2048)),
    "paper-long": (dict(epochs=40, lr_smooth=5e-3, lr_clip=1e-2), (128, 2048)),
}


@dataclass(frozen=True)
class ABQ:
    name: str = "abq"
    epochs: int = 1
    lr_smooth: float = 1e-2      # equivalent-transform scales
    lr_clip: float = 2e-2        # clipping (and compensation, unless lr_comp is set)
    lr_comp: float | None = None  # compensation vectors; None: lr_clip. Adam's first steps move every entry of
                                  # a by ~lr, i.e. every weight of its row by ~lr: with few steps that is large
    batch_size: int = 4
    alpha: float = 0.5           # SmoothQuant-style initialisation exponent (init="smoothquant")
    init: str = "auto"           # transform start: smoothquant | identity | awq | auto (per block, see _start)
    smooth: bool = True          # learnable equivalent transforms
    lwc: bool = True             # learnable weight clipping
    compensation: bool = True    # W + a b^T on down_proj of the first/last blocks
    comp_first: int = 3
    comp_last: int = 4
    use_mse: bool = True
    use_cos: bool = True
    use_attn: bool = True
    token_weight: str = "none"   # "sink": MSE per token capped at the median token's (abq_math.token_weights)
    clip_init: str = "grid"      # "grid": best shrink ratio per group; "paper": sigmoid(4) everywhere
    presets: ClassVar[dict] = PRESETS

    def __post_init__(self):
        if self.init not in ("auto", "smoothquant", "identity", "awq"):
            raise AbqError(f"abq init must be auto, smoothquant, identity or awq, got {self.init!r}")
        if self.token_weight not in ("none", "sink"):
            raise AbqError(f"abq token_weight must be none or sink, got {self.token_weight!r}")

    def needs_data(self, spec: QuantSpec) -> bool:
        return True

    @property
    def needs_attention_maps(self) -> bool:
        return self.use_attn

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}

    # ---- calibration --------------------------------------------------------------------------

    def search(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        """The transform half of a composition (abq+gptq): the trained parameters."""
        return self.calibrate(ctx)

    def calibrate(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        if not ctx.spec.act.is_float and not ctx.spec.act.dynamic:
            raise AbqError("abq calibrates with dynamic per-token activations; drop --act-static")
        block = ctx.block
        weights = {n: p.detach() for n, p in block.named_parameters()}
        groups = _groups(ctx)
        t1 = ctx.run(block, ctx.x_fp)
        t2 = ctx.run(block, ctx.x_q)
        a_fp_all = self._float_attention(ctx) if self.use_attn else None
        params = self._start(ctx, weights, groups, t1, t2, a_fp_all)
        trainable = [p for p in params.values() if p.requires_grad]
        if not trainable or self.epochs == 0:
            return {k: v.detach() for k, v in params.items()}
        lr_comp = self.lr_clip if self.lr_comp is None else self.lr_comp
        opt = torch.optim.AdamW([
            {"params": [v for k, v in params.items() if k.startswith("smooth.")], "lr": self.lr_smooth},
            {"params": [v for k, v in params.items() if k.startswith("clip.")], "lr": self.lr_clip},
            {"params": [v for k, v in params.items() if k.startswith("comp.")], "lr": lr_comp},
        ], weight_decay=0.0)
        n = ctx.x_q.shape[0]
        t0 = time.perf_counter()
        first = last = None
        for epoch in range(self.epochs):
            for idx in torch.randperm(n).split(self.batch_size):
                loss, terms = self._loss(ctx, weights, params, groups, idx, t1, t2, a_fp_all)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                first = first if first is not None else terms
                last = terms
        log.info("block %d: %s -> %s in %.1f s", ctx.index, _fmt(first), _fmt(last), time.perf_counter() - t0)
        return {k: v.detach().clone() for k, v in params.items()}

    def _loss(self, ctx, weights, params, groups, idx, t1, t2, a_fp_all):
        """ABQ's loss (and its terms) of the quantized block on the quantized stream's windows `idx`."""
        xq = ctx.x_q[idx].to(ctx.device)
        a_fp = a_fp_all[idx].to(ctx.device).float() if a_fp_all is not None else None
        with _capture_attention(ctx) if self.use_attn else contextlib.nullcontext([]) as maps:
            y = self._forward_q(ctx, weights, params, groups, xq)
        return M.abq_loss(y, t1[idx].to(ctx.device), t2[idx].to(ctx.device),
                          maps[0] if maps else None, a_fp, self.use_mse, self.use_cos, self.use_attn,
                          self.token_weight)

    def _start(self, ctx, weights, groups, t1, t2, a_fp_all) -> dict[str, torch.Tensor]:
        """Starting parameters. init=auto builds the AWQ-searched and the identity start and keeps
        the one whose ABQ loss (all calibration windows, in order, before any step) is lower, per
        block: at 2 bits AWQ's scales (searched for round-to-nearest error) can start far worse."""
        stats = _input_stats(ctx, list(dict.fromkeys([*ctx.linears, *(g.linears[0] for _, g in groups)])))
        kinds = self._init_kinds(ctx)
        awq = self._awq_scales(ctx) if self.smooth and "awq" in kinds else {}
        starts = {k: self._init_params(ctx, weights, groups, k, stats, awq) for k in kinds}
        if len(starts) == 1:
            return next(iter(starts.values()))
        losses = {}
        with torch.no_grad():
            for kind, params in starts.items():
                batches = torch.arange(ctx.x_q.shape[0]).split(self.batch_size)
                losses[kind] = sum(self._loss(ctx, weights, params, groups, idx, t1, t2, a_fp_all)[0].item() * len(idx)
                                   for idx in batches) / ctx.x_q.shape[0]
        best = min(kinds, key=lambda k: losses[k])  # ties: the first (awq)
        log.info("block %d: init %s (step-0 loss %s)", ctx.index, best,
                 ", ".join(f"{k} {v:.4g}" for k, v in losses.items()))
        return starts[best]

    @torch.no_grad()
    def _float_attention(self, ctx: BlockContext) -> torch.Tensor | None:
        """Head-averaged attention maps of the float block on the float stream, once (kept in fp16)."""
        maps_all = []
        for i in range(0, ctx.x_fp.shape[0], ctx.batch_size):
            with _capture_attention(ctx) as maps:
                ctx.block(ctx.x_fp[i:i + ctx.batch_size].to(ctx.device), **ctx.kwargs)
            if not maps:
                return None  # attention implementation returns no probabilities (not eager)
            maps_all.append(maps[0].half().cpu())
        return torch.cat(maps_all)

    def _awq_scales(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        # With quantized activations AWQ's loss runs every sampled token through each ratio
        # (no Gram shortcut): 2,048 rows keep the init to seconds per block on a CPU.
        tokens = AWQ.search_tokens if ctx.spec.act.is_float else 2048
        return AWQ(clip=False, search_tokens=tokens).search(ctx)

    def _init_params(self, ctx: BlockContext, weights, groups, kind: str, stats, awq: dict) -> dict[str, torch.Tensor]:
        params: dict[str, torch.Tensor] = {}
        stats, sq = stats
        if self.smooth:
            dims = attention_dims(ctx.block.get_submodule(ctx.arch.attn).config)
            for i, g in groups:
                x_max = stats[g.linears[0]]
                w_max = torch.cat([weights[f"{l}.weight"] for l in g.linears]).abs().amax(0)
                prev_out = weights[f"{g.prev}.weight"].shape[0]
                # o_proj's input per query head -> v_proj's output channels (grouped-query heads)
                x_max, w_max = reduce_kv(x_max, prev_out, dims[2]), reduce_kv(w_max, prev_out, dims[2])
                params[M.group_key(i)] = self._init_smooth(kind, g, x_max, w_max, awq).requires_grad_()
        spec = ctx.spec.weight
        new = self._transformed(ctx, weights, {k: v.detach() for k, v in params.items()}, groups)
        if self.smooth and not ctx.spec.act.is_float and self.clip_init == "grid":
            # E[x^2] of each linear's input in the transformed float block: unweighted, the grid
            # clips the columns that meet large inputs (W4A8 block 10: output MSE 0.70 vs RTN 0.23)
            sq = _input_stats(ctx, list(ctx.linears), new)[1]
        for name in ctx.linears:
            w = new.get(f"{name}.weight", weights[f"{name}.weight"])
            # weight-only: the untransformed block's statistics (the transform's effect is left out)
            col = sq[name]
            init = M.clip_grid_init(w, spec, col) if self.clip_init == "grid" else \
                torch.full((w.shape[0], P.num_groups(w.shape[1], spec.group_size)), M.CLIP_INIT, device=w.device)
            for side in ("lo", "hi"):
                params[f"clip.{name}.{side}"] = init.clone().requires_grad_(self.lwc)
        down = ctx.arch.mlp_down
        use_comp = self.compensation and (ctx.index < self.comp_first or ctx.index >= ctx.num_blocks - self.comp_last)
        if use_comp and down in ctx.linears:
            w = weights[f"{down}.weight"]
            params[f"comp.{down}.a"] = torch.zeros(w.shape[0], 1, device=w.device, requires_grad=True)
            params[f"comp.{down}.b"] = torch.ones(1, w.shape[1], device=w.device, requires_grad=True)
        return params

    def _init_kinds(self, ctx: BlockContext) -> list[str]:
        """Transform starts to try. auto: AWQ's searched scales (for weight-only, smoothing by
        activation range moves difficulty into the weights, the wrong way; with quantized
        activations the search also weighs the activation error) and identity, the better one per
        block by step-0 loss (see _start). Without learnable transforms there is nothing to choose."""
        if self.init != "auto":
            return [self.init]
        return ["awq", "identity"] if self.smooth else ["identity"]

    def _init_smooth(self, kind: str, group, x_max, w_max, awq: dict) -> torch.Tensor:
        """log-scale [prev out] of one LinearGroup at the start of training."""
        if kind == "smoothquant":
            return M.smooth_init(x_max, w_max, self.alpha)
        s = awq.get(f"smooth.{group.prev}") if kind == "awq" else None  # None: identity, or AWQ skipped it
        return torch.zeros_like(x_max) if s is None else s.to(x_max.device).float().log()

    def _transformed(self, ctx: BlockContext, weights, params, groups) -> dict[str, torch.Tensor]:
        dims = attention_dims(ctx.block.get_submodule(ctx.arch.attn).config)
        return M.transform_block(weights, params, [(M.group_key(i), g) for i, g in groups], ctx.arch, dims)

    def _forward_q(self, ctx: BlockContext, weights, params, groups, x: torch.Tensor) -> torch.Tensor:
        new = self._transformed(ctx, weights, params, groups)
        for name in ctx.linears:
            w = new.get(f"{name}.weight", weights[f"{name}.weight"])
            new[f"{name}.weight"] = M.fake_quant_clipped(w, ctx.spec.weight, params[f"clip.{name}.lo"],
                                                         params[f"clip.{name}.hi"])
        with _act_quant(ctx):
            out = functional_call(ctx.block, new, (x,), ctx.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    # ---- fold ---------------------------------------------------------------------------------

    @torch.no_grad()
    def fold(self, block: nn.Module, ctx: BlockContext, result: dict[str, torch.Tensor]) -> None:
        """Fold the trained transforms and compensation into `block` (weights, biases, norms)."""
        weights = {n: p.detach() for n, p in block.named_parameters()}
        new = self._transformed(ctx, weights, {k: v.to(ctx.device) for k, v in result.items()}, _groups(ctx))
        for name, t in new.items():
            block.get_parameter(name).copy_(t)

    @torch.no_grad()
    def qparams(self, block: nn.Module, ctx: BlockContext,
                result: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Scale and zero point [N, G] of each linear of a folded block: its learned clipping range."""
        out = {}
        for name in ctx.linears:
            w = block.get_submodule(name).weight.detach().float()
            lo, hi = M.clip_range(w, ctx.spec.weight, result[f"clip.{name}.lo"].to(w.device),
                                  result[f"clip.{name}.hi"].to(w.device))
            out[name] = P.weight_qparams(w, ctx.spec.weight, lo, hi)
        return out

    @torch.no_grad()
    def apply(self, ctx: BlockContext, result: dict[str, torch.Tensor]) -> dict[str, QuantLinear]:
        self.fold(ctx.block, ctx, result)
        qp = self.qparams(ctx.block, ctx, result)
        return {name: QuantLinear.from_float(lin, ctx.spec.layer, *qp[name]) for name, lin in ctx.linears.items()}


def _groups(ctx: BlockContext):
    """(index, group) of the arch's linear groups that have a producer to fold a scale into."""
    return [(i, g) for i, g in enumerate(ctx.arch.groups) if ctx.foldable(g)]


@torch.no_grad()
def _input_stats(ctx: BlockContext, names: list[str], tensors: dict[str, torch.Tensor] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-channel max |x| and mean x^2 of each named linear's input on the float stream, through the
    block or, with `tensors`, through the block with those parameters replaced (a transformed block)."""
    amax: dict[str, torch.Tensor] = {}
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_m, args, name=name):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            m, s = a.abs().amax(0), a.pow(2).sum(0)
            amax[name] = torch.maximum(amax[name], m) if name in amax else m
            sq[name] = sq[name] + s if name in sq else s
        handles.append(ctx.block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        if tensors is None:
            ctx.run(ctx.block, ctx.x_fp)
        else:
            for i in range(0, ctx.x_fp.shape[0], ctx.batch_size):
                functional_call(ctx.block, tensors, (ctx.x_fp[i:i + ctx.batch_size].to(ctx.device),), ctx.kwargs)
    finally:
        for h in handles:
            h.remove()
    tokens = ctx.x_fp.shape[0] * ctx.x_fp.shape[1]
    return amax, {k: v / tokens for k, v in sq.items()}


@contextlib.contextmanager
def _act_quant(ctx: BlockContext):
    """Fake-quantize the input of every quantized linear (per token, straight-through)."""
    if ctx.spec.act.is_float:
        yield
        return
    spec = ctx.spec.act
    handles = [lin.register_forward_pre_hook(lambda _m, args: (P.fake_quant_act(args[0], spec), *args[1:]))
               for lin in ctx.linears.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _capture_attention(ctx: BlockContext):
    """Head-averaged attention probabilities of the block's attention (needs eager attention)."""
    maps: list[torch.Tensor] = []

    def hook(_m, _args, out):
        if isinstance(out, tuple) and len(out) > 1 and out[1] is not None:
            maps.append(out[1].mean(1))

    h = ctx.block.get_submodule(ctx.arch.attn).register_forward_hook(hook)
    try:
        yield maps
    finally:
        h.remove()


def _fmt(terms: dict | None) -> str:
    return "{}" if not terms else ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
