"""GPTQ (Frantar et al. 2022): round one column at a time and push each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian H = 2 X^T X / n of the layer's inputs X.

Follows IST-DASLab/gptq `fasterquant` (dampening, Cholesky factor of H^-1, lazy column blocks of 128),
with the stored format of abqllm: qparams come from abqllm.quant.primitives and the result is the
codes, scales and zeros a QuantLinear stores (exact, no re-rounding).
Groups: qparams of a group are computed when the column loop enters it, from the group's current
(already error-updated) columns. The reference reads them from a stale copy when a group starts inside
a column block; here the column block is a multiple of the group size, so the current values are at
hand. With act_order (columns in order of decreasing diag(H)) and groups, the groups' qparams are
computed up front from the unquantized weight ("static groups"), so every group stays a contiguous
run of columns in the stored layout; `static_groups=True` does the same without act_order.

Inputs X come from the quantized stream (ctx.x_q). With `sequential` (the default, GPTQ's
"true sequential"), the block's LinearGroups are done in forward order on a working copy in which the
groups already done are quantized: o_proj sees the output of quantized q/k/v, and so on (one block
forward per group). Otherwise all linears read the float block's inputs on x_q (one forward).
H uses the linears' float inputs even when activations are quantized (WxA<16).

`asym` (asymmetric calibration, after GPTAQ, Li et al. 2025): the quantized stream's inputs X differ
from the float stream's X~, and what the next block should see is the float output X~ W^T, not X W^T.
The least-squares weight for that target is W* = W + W D H^-1 with D = (X~ - X)^T X; and since
||X~ W^T - X Q^T||^2 = ||X (W* - Q)^T||^2 + const, GPTQ run on W* (same Hessian) minimises the
asymmetric error exactly. `asym` in [0, 1] scales the correction (1: the full least-squares shift).

`refit` (rounds of scale refitting): GPTQ fixes each group's scale before rounding and never revisits it.
Once the codes are chosen, the scales that minimise the same objective (W - Q) H (W - Q)^T for those codes
(zero points fixed: they are integers in the format) are a small least-squares solve per row
(`refit_scales`). Each further round runs GPTQ again on the refitted scales and refits once more.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass

import torch

from abqllm.calib.runner import BlockContext
from abqllm.errors import AbqError
from abqllm.formats.packing import pack_bits
from abqllm.nn.qlinear import QuantLinear
from abqllm.quant import primitives as P
from abqllm.spec import LayerSpec, QuantSpec, WeightSpec


def dampening(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """GPTQ's damp = percdamp * mean(diag H), added to H's diagonal wherever H is inverted or solved with."""
    return percdamp * torch.mean(torch.diag(h)).clamp(min=1e-8)


def damped(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H + damp I."""
    return h + dampening(h, percdamp) * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)


@torch.no_grad()
def inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H); more damping if needed."""
    k = h.shape[0]
    damp = dampening(h, percdamp)
    eye = torch.eye(k, device=h.device, dtype=h.dtype)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return upper
        damp = damp * 10
    raise RuntimeError("the Hessian stays singular after dampening; use more or other calibration data")


@torch.no_grad()
def asymmetric_target(w: torch.Tensor, h: torch.Tensor, d: torch.Tensor, percdamp: float,
                      strength: float = 1.0) -> torch.Tensor:
    """W + strength * W D (H + damp I)^-1: the weight whose output on the quantized stream's inputs best
    matches the float weight's output on the float stream's inputs (H = 2 X^T X / n, D = 2 (X~ - X)^T X / n).
    """
    w, d = w.detach().float(), d.detach().float()
    h = damped(h.detach().float(), percdamp)
    # (W D) H^-1 = solve(H, (W D)^T)^T, H symmetric positive definite after dampening
    shift = torch.linalg.solve(h, (w @ d).T).T
    return w + strength * shift


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: WeightSpec, percdamp: float = 0.01,
                  block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False,
                  qparams: tuple[torch.Tensor, torch.Tensor] | None = None, positions: bool = False):
    """Weight [N, K], Hessian [K, K] -> codes uint8 [N, K], scale [N, G], zero [N, G] (stored layout).

    With `positions`, also float32 [N, K]: where on the code axis each weight stood when it was rounded
    (its error-compensated value / scale + zero, before rounding and clamping); code - position says how
    near the rounding boundary GPTQ's choice was (block tuning's code offsets start from it).

    `qparams` fixes the scale and zero point [N, G] (e.g. learned clipping ranges); else they come
    from the weight's own min/max.

    Dequantized, P.dequantize_weight(codes, scale, zero, spec.group_size) is the GPTQ weight.
    """
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    n, k = w.shape
    gs = spec.group_size
    column_spec = dataclasses.replace(spec, group_size=0)  # qparams of one group / one column
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = gs == 0 or static_groups or act_order or qparams is not None
    if qparams is not None:
        scale, zero = (t.detach().float().to(w.device) for t in qparams)
    elif static:
        scale, zero = P.weight_qparams(w, spec)
    else:
        g = P.num_groups(k, gs)
        scale = torch.zeros(n, g, device=w.device)
        zero = torch.zeros(n, g, device=w.device)
        block_size = max(gs, block_size // gs * gs)  # a group never spans two column blocks
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    group_of = torch.zeros(k, dtype=torch.long) if gs == 0 else (perm // gs).cpu()  # stored group of column
    hinv = inverse_hessian_factor(h, percdamp)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    where = torch.zeros(n, k, device=w.device) if positions else None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(group_of[col])
            if not static and col % gs == 0:
                s_g, z_g = P.weight_qparams(w1[:, i:i + gs], column_spec)
                scale[:, gi], zero[:, gi] = s_g[:, 0], z_g[:, 0]
            s, z = scale[:, gi:gi + 1], zero[:, gi:gi + 1]
            q = P.quantize_weight(w1[:, i:i + 1], column_spec, s, z)
            if where is not None:
                where[:, col] = w1[:, i] / s[:, 0] + z[:, 0]
            codes[:, col] = q[:, 0]
            wq = P.dequantize_weight(q, s, z, 0)[:, 0]
            e = (w1[:, i] - wq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    back = torch.argsort(perm)
    if where is not None:
        return codes[:, back], scale, zero, where[:, back]
    return codes[:, back], scale, zero


@torch.no_grad()
def refit_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 group_size: int, percdamp: float = 0.01) -> torch.Tensor:
    """Scales [N, G] that minimise (w - s (codes - zero)) (H + damp I) (w - ...)^T row by row, codes and zero
    points fixed: the layer's output error on the calibration inputs, now that GPTQ has chosen the codes.

    GPTQ picks the scale before rounding (min/max or a learned clip) and never revisits it; once the codes
    are known the best scale of each row's groups is a small least-squares solve (G x G per row; the groups
    of a row are coupled through H). Groups without a non-zero code keep their scale, and so do rows whose
    solve is not usable (a non-positive or non-finite scale, or a larger error once rounded to the float16
    grid the format stores).
    """
    w, h = w.detach().float(), damped(h.detach().float(), percdamp)
    n, k = w.shape
    g = scale.shape[1]
    d = codes.float() - P.expand_groups(zero.float(), k, group_size)  # [N, K] centred codes
    groups = torch.zeros(k, dtype=torch.long, device=w.device) if group_size == 0 else \
        torch.arange(k, device=w.device) // group_size
    onehot = torch.nn.functional.one_hot(groups, g).float()  # [K, G]
    # a[n, g, g'] = sum_{k in g, k' in g'} d[n,k] H[k,k'] d[n,k'];  b[n, g] = sum_{k in g} d[n,k] (H w_n)[k]
    hw = w @ h
    b = (d * hw) @ onehot
    a = torch.empty(n, g, g, device=w.device)
    for j in range(g):  # the columns of group j: y[n, k] = sum_{k' in j} H[k, k'] d[n, k']
        cols = groups == j
        y = d[:, cols] @ h[cols]  # [N, K]
        a[:, :, j] = (d * y) @ onehot
    ridge = 1e-6 * a.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)
    a = a + ridge[:, None, None] * torch.eye(g, device=w.device)
    new = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1).half().float()
    old = scale.float()
    used = ((d != 0).float() @ onehot) > 0  # a group without a non-zero code does not depend on its scale
    new = torch.where(used, new, old)

    def error(s):  # per row: (w - w_hat) H (w - w_hat)^T
        e = w - d * P.expand_groups(s, k, group_size)
        return ((e @ h) * e).sum(1)

    ok = torch.isfinite(new).all(1) & (new > 0).all(1)
    ok &= error(torch.where(ok[:, None], new, old)) <= error(old)
    return torch.where(ok[:, None], new, old)


class HessianStats:
    """Forward pre-hooks that accumulate X^T X, the token count and the input range of each linear;
    with `float_hook`s on the float block's twins (run on the same windows just before), also
    D = (X~ - X)^T X for the asymmetric target."""

    def __init__(self, linears: dict[str, torch.nn.Module]):
        self.xtx: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.range: dict[str, tuple[float, float]] = {}
        self.float_x: dict[str, torch.Tensor] = {}
        self.linears = linears

    def float_hook(self, name: str):
        def fn(_module, args):
            self.float_x[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return fn

    def hook(self, name: str):
        def fn(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            prev = self.xtx.get(name)
            self.xtx[name] = x.T @ x if prev is None else prev.addmm_(x.T, x)
            x_fp = self.float_x.pop(name, None)
            if x_fp is not None:
                delta = x_fp - x
                prev = self.cross.get(name)
                self.cross[name] = delta.T @ x if prev is None else prev.addmm_(delta.T, x)
            self.count[name] = self.count.get(name, 0) + x.shape[0]
            lo, hi = self.range.get(name, (float("inf"), float("-inf")))
            self.range[name] = (min(lo, x.min().item()), max(hi, x.max().item()))
        return fn

    def hessian(self, name: str) -> torch.Tensor:
        return self.xtx[name] * (2.0 / self.count[name])

    def cross_term(self, name: str) -> torch.Tensor:
        return self.cross[name] * (2.0 / self.count[name])


def quant_linear_from_codes(linear: torch.nn.Linear, spec: LayerSpec, codes: torch.Tensor, scale: torch.Tensor,
                            zero: torch.Tensor, act_range: tuple[float, float] | None = None) -> QuantLinear:
    """A QuantLinear holding exactly these codes/scales/zeros (bias and activation scale from `linear`)."""
    q = QuantLinear.from_float(linear, spec, scale, zero, act_range)
    q.qweight.copy_(pack_bits(codes.to(q.qweight.device), spec.weight.storage_bits))
    return q


@dataclass(frozen=True)
class GPTQ:
    name: str = "gptq"
    percdamp: float = 0.01
    block_size: int = 128
    # On by default (as GPTQModel's desc_act): SmolLM2's input channels have outliers up to 50,000x
    # the median of diag(H), and GPTQ without it barely beats RTN there (W4A16, 4 windows: 32.15 vs
    # 28.29 with it, RTN 35.60; benchmarks/results/abq_dev_runs.md and methods_smollm2-135m.json).
    act_order: bool = True
    static_groups: bool = False  # implied by act_order when there are groups
    sequential: bool = True      # groups in forward order, later ones reading quantized earlier ones
    asym: float = 0.0            # asymmetric calibration strength (module docstring); 0: plain GPTQ
    refit: int = 0               # rounds of: re-solve the scales for the codes (refit_scales), round again on
                                 # them; 0: plain GPTQ

    def __post_init__(self):
        if isinstance(self.asym, bool) or not isinstance(self.asym, (int, float)) or not 0.0 <= self.asym <= 1.0:
            raise AbqError(f"gptq asym must be in [0, 1] (0: off, 1: the full least-squares shift), got {self.asym}")
        if isinstance(self.refit, bool) or not isinstance(self.refit, int) or not 0 <= self.refit <= 8:
            raise AbqError(f"gptq refit must be a whole number of rounds in 0..8 (0: off), got {self.refit!r}")

    def needs_data(self, spec: QuantSpec) -> bool:
        return True

    def settings(self) -> dict:
        # asym and refit are left out while off, so calibration artifacts made before they existed keep their keys
        return {k: v for k, v in asdict(self).items()
                if k != "name" and not (k in ("asym", "refit") and not v)}

    @torch.no_grad()
    def calibrate(self, ctx: BlockContext, qparams: dict | None = None,
                  positions: dict | None = None) -> dict[str, torch.Tensor]:
        """`qparams` {linear: (scale, zero)} fixes the grid of some linears (compositions). A `positions` dict
        is filled with each linear's rounding positions (gptq_quantize), for block tuning of the codes."""
        static_act = not ctx.spec.act.is_float and not ctx.spec.act.dynamic
        # asym reads the float block too, so it never hooks the block it quantizes
        work = copy.deepcopy(ctx.block) if self.sequential or self.asym else ctx.block
        if self.sequential:
            stages = [[n for n in g.linears if n in ctx.linears] for g in ctx.arch.groups]
        else:
            stages = [list(ctx.linears)]
        result: dict[str, torch.Tensor] = {}
        for names in filter(None, stages):
            linears = {n: work.get_submodule(n) for n in names}
            stats = HessianStats(linears)
            handles = [lin.register_forward_pre_hook(stats.hook(n)) for n, lin in linears.items()]
            if self.asym:  # the float block's twins of these linears, on the float stream
                handles += [ctx.block.get_submodule(n).register_forward_pre_hook(stats.float_hook(n))
                            for n in names]
            try:
                if self.asym:  # window by window: each quantized input meets its float twin
                    for i in range(0, ctx.x_q.shape[0], ctx.batch_size):
                        ctx.run(ctx.block, ctx.x_fp[i:i + ctx.batch_size])
                        ctx.run(work, ctx.x_q[i:i + ctx.batch_size])
                else:
                    ctx.run(work, ctx.x_q)
            finally:
                for hd in handles:
                    hd.remove()
            for n, lin in linears.items():
                w, h = lin.weight, stats.hessian(n)
                if self.asym:
                    w = asymmetric_target(w, h, stats.cross_term(n), self.percdamp, self.asym)
                want = positions is not None
                codes, scale, zero, *where = gptq_quantize(w, h, ctx.spec.weight, self.percdamp, self.block_size,
                                                           self.act_order, self.static_groups,
                                                           (qparams or {}).get(n), want)
                for r in range(self.refit):  # the last round's codes were chosen on the scales stored
                    scale = refit_scales(w, h, codes, scale, zero, ctx.spec.weight.group_size, self.percdamp)
                    if r + 1 < self.refit:
                        codes, scale, zero, *where = gptq_quantize(w, h, ctx.spec.weight, self.percdamp,
                                                                   self.block_size, self.act_order,
                                                                   self.static_groups, (scale, zero), want)
                if want:
                    positions[n] = where[0]
                result.update({f"{n}.codes": codes, f"{n}.scale": scale, f"{n}.zero": zero})
                act_range = stats.range[n] if static_act else None
                if static_act:
                    result[f"{n}.act_range"] = torch.tensor(act_range)
                if self.sequential:
                    work.set_submodule(n, quant_linear_from_codes(lin, ctx.spec.layer, codes, scale, zero,
                                                                  act_range))
        return result

    def apply(self, ctx: BlockContext, result: dict[str, torch.Tensor]) -> dict[str, QuantLinear]:
        def get(name, what):
            return result[f"{name}.{what}"].to(ctx.device)

        out = {}
        for n, lin in ctx.linears.items():
            r = result.get(f"{n}.act_range")
            out[n] = quant_linear_from_codes(lin, ctx.spec.layer, get(n, "codes"), get(n, "scale"), get(n, "zero"),
                                             None if r is None else tuple(r.tolist()))
        return out
