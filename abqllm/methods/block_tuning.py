"""Block tuning after rounding: with every linear's integer codes and zero points fixed, train the block's
float quantities (each linear's group scales, and the block's norm weights) against the float block's
outputs, with ABQ's MSE + cosine loss on both streams.

Why: GPTQ chooses each scale before rounding (from ABQ's learned clip) and never looks at the block as a
whole; per-layer scale refitting (gptq refit) moved nothing at 2 bits (W2*A16+had 66.88 -> 67.09). Once
the codes are known, the scales and norms are a small set of continuous parameters whose effect on the
block output is differentiable, so they can absorb part of the rounding error of all linears together
(the idea of EfficientQAT's step-size training, done here block by block on the calibration windows).

With tune_codes_lr > 0 the codes move too (AutoRound's learned rounding, started from GPTQ's rounding
instead of round-to-nearest): code = clamp(c0 + round(b + v), 0, qmax), where c0 is GPTQ's code,
b = position - c0 clipped to [-1/2, 1/2] says how near the rounding boundary GPTQ's error-compensated weight
stood (gptq_quantize's positions), and the learned v in [-1/2, 1/2] starts at 0, so tuning starts from GPTQ's
codes exactly and a code moves by one level at most; the gradient passes straight through the rounding.
Why: with one scale per output channel (W4A16 per channel) the scales are N numbers per linear, too few to
absorb much of the rounding error; the codes are where the freedom is. Why b: a weight that stood next to
the boundary costs little to flip, one that stood on a level costs a whole step; with b = 0 for all
(tried first) every code is equally far from moving and the flips made the tiny test block worse.
On the default model at the CPU presets' data (a few thousand tokens a block) it lowers the training loss
and not the held-out one (benchmarks/code_tuning_probe.py): off by default, meant for paper-size data.

Both are parametrised multiplicatively (s = s0 exp(theta), g = g0 exp(phi), theta = phi = 0 at the start),
so one learning rate suits scales of any size and a norm weight never changes sign. The tuned block is kept
only if its loss over all calibration windows is lower than before tuning. Scales are stored on the float16
grid of the format; activation ranges measured for static activation quantization would go stale when a
norm moves, so norms stay fixed there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.func import functional_call

from abqllm.calib.runner import BlockContext
from abqllm.errors import AbqError
from abqllm.methods import abq_math as M
from abqllm.methods.abq import _act_quant  # the one straight-through activation fake quant
from abqllm.quant import primitives as P

log = logging.getLogger(__name__)

TUNED = "tuned."  # result key prefix of a tuned float parameter of the block (e.g. tuned.input_layernorm.weight)


@dataclass(frozen=True)
class BlockTuning:
    tune_epochs: int = 0      # passes over the calibration windows; 0: off
    tune_lr: float = 1e-3     # Adam step on log-scales / log-norm-weights (about 0.1% per step)
    tune_norms: bool = True   # also tune the block's 1-D weights (norms)
    tune_batch: int = 4       # windows per step
    tune_holdout: float = 0.0  # fraction of the windows held out: train on the rest, keep the epoch (0 = none) with the
                               # lowest loss on the held-out ones; 0: train on all, keep the end if it lowered their loss
    tune_codes_lr: float = 0.0  # Adam step on the per-weight code offsets (module docstring); 0: codes stay GPTQ's

    def __post_init__(self):
        if isinstance(self.tune_epochs, bool) or not isinstance(self.tune_epochs, int) or self.tune_epochs < 0:
            raise AbqError(f"tune_epochs must be a whole number >= 0 (0: off), got {self.tune_epochs!r}")
        if not isinstance(self.tune_lr, (int, float)) or isinstance(self.tune_lr, bool) or not self.tune_lr > 0:
            raise AbqError(f"tune_lr must be a positive number, got {self.tune_lr!r}")
        if isinstance(self.tune_batch, bool) or not isinstance(self.tune_batch, int) or self.tune_batch < 1:
            raise AbqError(f"tune_batch must be a whole number >= 1, got {self.tune_batch!r}")
        if isinstance(self.tune_holdout, bool) or not isinstance(self.tune_holdout, (int, float)) \
                or not 0.0 <= self.tune_holdout < 1.0:
            raise AbqError(f"tune_holdout must be a fraction in [0, 1) (0: none), got {self.tune_holdout!r}")
        if isinstance(self.tune_codes_lr, bool) or not isinstance(self.tune_codes_lr, (int, float)) \
                or not self.tune_codes_lr >= 0:
            raise AbqError(f"tune_codes_lr must be a number >= 0 (0: codes fixed), got {self.tune_codes_lr!r}")

    @property
    def enabled(self) -> bool:
        return self.tune_epochs > 0

    def settings(self) -> dict:
        # absent while off, so artifacts made before tuning existed keep their keys
        if not self.enabled:
            return {}
        out = {"tune_epochs": self.tune_epochs, "tune_lr": self.tune_lr, "tune_norms": self.tune_norms,
               "tune_batch": self.tune_batch}
        if self.tune_holdout:
            out["tune_holdout"] = self.tune_holdout
        if self.tune_codes_lr:
            out["tune_codes_lr"] = self.tune_codes_lr
        return out

    def tune(self, float_ctx: BlockContext, work_ctx: BlockContext, result: dict[str, torch.Tensor],
             positions: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """New "<linear>.scale" entries and "tuned.<param>" entries for `result` (codes/scale/zero per linear),
        and new "<linear>.codes" entries when the codes are tuned too (that needs GPTQ's `positions`).

        `float_ctx.block` is the untouched float block (the targets); `work_ctx.block` the same block with the
        transform folded in, whose linears the codes belong to.
        """
        missing = [n for n in work_ctx.linears if f"{n}.codes" not in result]
        if missing:
            raise AbqError(f"block tuning needs codes from the rounding step (gptq); none for {', '.join(missing)}")
        if self.tune_codes_lr and set(positions or {}) != set(work_ctx.linears):
            raise AbqError("code tuning (tune_codes_lr > 0) needs GPTQ's rounding positions for every linear; "
                           "use it with a +gptq method")
        dev = work_ctx.device
        block = work_ctx.block
        gs = work_ctx.spec.weight.group_size
        with torch.no_grad():
            t1 = float_ctx.run(float_ctx.block, float_ctx.x_fp)
            t2 = float_ctx.run(float_ctx.block, float_ctx.x_q)
        base = {n: p.detach() for n, p in block.named_parameters()}
        qmax = work_ctx.spec.weight.qmax
        codes0, zeros, scale0, theta, offset, lean = {}, {}, {}, {}, {}, {}
        for n, lin in work_ctx.linears.items():
            k = lin.weight.shape[1]
            codes0[n] = result[f"{n}.codes"].to(dev)
            zeros[n] = P.expand_groups(result[f"{n}.zero"].to(dev).float(), k, gs)
            scale0[n] = result[f"{n}.scale"].to(dev).float()
            theta[n] = torch.zeros_like(scale0[n], requires_grad=True)
            if self.tune_codes_lr:
                offset[n] = torch.zeros_like(zeros[n], requires_grad=True)
                lean[n] = (positions[n].to(dev).float() - codes0[n].float()).clamp(-0.5, 0.5)

        def codes_of(n):  # GPTQ's codes, moved by the rounded offsets (gradient straight through)
            c = codes0[n].float()
            return (c + P.round_ste(lean[n] + offset[n])).clamp(0, qmax) if n in offset else c
        static_act = any(f"{n}.act_range" in result for n in work_ctx.linears)
        linear_weights = {f"{n}.weight" for n in work_ctx.linears}
        norms = {} if not self.tune_norms or static_act else {
            name: torch.zeros_like(p, requires_grad=True) for name, p in base.items()
            if p.dim() == 1 and name.endswith("weight") and name not in linear_weights}

        def params():
            out = dict(base)
            for n in codes0:
                s = scale0[n] * theta[n].exp()
                centred = codes_of(n) - zeros[n]
                out[f"{n}.weight"] = (centred * P.expand_groups(s, centred.shape[1], gs)).to(base[f"{n}.weight"].dtype)
            for name, phi in norms.items():
                out[name] = base[name] * phi.exp()
            return out

        def loss_on(idx):
            with _act_quant(work_ctx):
                out = functional_call(block, params(), (work_ctx.x_q[idx].to(dev),), work_ctx.kwargs)
            y = out[0] if isinstance(out, (tuple, list)) else out
            return M.abq_loss(y, t1[idx].to(dev), t2[idx].to(dev), None, None, True, True, False)[0]

        def total_loss(windows):
            with torch.no_grad():
                return sum(loss_on(idx).item() * len(idx) for idx in windows.split(self.tune_batch)) / len(windows)

        def snapshot():  # what the format will hold: scales on the float16 grid
            out = {}
            for n in theta:
                out[n] = stored_log_scale(scale0[n], theta[n])
            return (out, {name: phi.detach().clone() for name, phi in norms.items()},
                    {n: v.detach().clone() for n, v in offset.items()})

        def restore(snap):
            with torch.no_grad():
                for part, live in zip(snap, (theta, norms, offset)):
                    for name, t in part.items():
                        live[name].copy_(t)

        n_win = work_ctx.x_q.shape[0]
        held = min(n_win - 1, round(n_win * self.tune_holdout)) if self.tune_holdout else 0
        if held:
            order = torch.randperm(n_win)
            judge, train = order[:held], order[held:]
        else:  # (no draw here: runs without a hold-out keep the shuffles they were measured with)
            judge = train = torch.arange(n_win)
        t0 = time.perf_counter()
        before = best = total_loss(judge)
        best_snap, best_epoch = snapshot(), 0
        groups = [{"params": [*theta.values(), *norms.values()]}]
        if offset:
            groups.append({"params": list(offset.values()), "lr": self.tune_codes_lr})
        opt = torch.optim.Adam(groups, lr=self.tune_lr)
        for epoch in range(1, self.tune_epochs + 1):
            for idx in train[torch.randperm(len(train))].split(self.tune_batch):
                loss = loss_on(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # |lean + v| <= 1: one level either way at most
                    for v in offset.values():
                        v.clamp_(-0.5, 0.5)
            if held or epoch == self.tune_epochs:  # held out: the best epoch on unseen windows; else the last
                raw = ({n: t.detach().clone() for n, t in theta.items()}, {}, {})
                snap = snapshot()
                restore(snap)  # judged as stored (fp16 scales)
                cur = total_loss(judge)
                if cur < best:
                    best, best_snap, best_epoch = cur, snap, epoch
                restore(raw)  # training goes on from the unrounded scales
        log.info("block %d: tuning loss (%s) %.5g -> %.5g, epoch %d of %d, in %.1f s", work_ctx.index,
                 "held-out" if held else "calibration", before, best, best_epoch, self.tune_epochs,
                 time.perf_counter() - t0)
        if best_epoch == 0:
            return {}
        restore(best_snap)
        with torch.no_grad():
            out = {f"{n}.scale": (scale0[n] * theta[n].exp()).half().float().cpu() for n in theta}
            out.update({TUNED + name: (base[name] * phi.exp()).cpu() for name, phi in norms.items()})
            out.update({f"{n}.codes": codes_of(n).to(result[f"{n}.codes"].dtype).cpu() for n in offset})
        if offset:
            moved = sum(int((out[f"{n}.codes"] != result[f"{n}.codes"].cpu()).sum()) for n in offset)
            log.info("block %d: %.2f%% of the codes moved by one level", work_ctx.index,
                     100.0 * moved / sum(v.numel() for v in offset.values()))
        return out


@torch.no_grad()
def stored_log_scale(scale0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """theta moved so that s0 exp(theta) is on the float16 grid the format stores scales on (0 where s0 = 0)."""
    stored = (scale0 * theta.exp()).half().float()
    return torch.where(scale0 > 0, (stored / scale0).log(), torch.zeros_like(stored))


@torch.no_grad()
def apply_tuned(block: torch.nn.Module, result: dict[str, torch.Tensor]) -> None:
    """Write the tuned float parameters of `result` into `block`."""
    for key, value in result.items():
        if key.startswith(TUNED):
            p = block.get_parameter(key[len(TUNED):])
            p.copy_(value.to(p.device, p.dtype))
