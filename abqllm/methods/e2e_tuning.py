"""End-to-end tuning of a quantized model: with every QuantLinear's integer codes and zero points fixed, train
the model's float quantities (each linear's scales, and the norm weights) so that the model's next-token
distribution matches the float model's, by the KL divergence KL(p_float || p_quant) on calibration windows.

Why: block-wise calibration (abq, gptq, block tuning) makes each block reproduce the float block's output,
one block at a time; the errors it leaves add up along the 30 blocks, and what the user measures is the last
layer's distribution. With the codes fixed, the scales (one per output channel or group) and norms are a
small set of continuous parameters (about 0.15% of SmolLM2-135M's weights) that can be trained against that
final distribution directly, every block at once. This is EfficientQAT's end-to-end step-size training
(E2E-QP), with distillation from the float model instead of the next-token loss: the target is the float
model's behaviour, and a soft target says more per token than one label.

As in block tuning (methods/block_tuning.py), the parameters are multiplicative (s = s0 exp(theta),
g = g0 exp(phi), zero at the start), a fraction `holdout` of the windows is kept out of training, and the
epoch (0 = the untouched model) with the lowest held-out KL is what is kept, with the scales on the float16
grid the format stores. Static activation ranges would go stale when a norm moves, so with static
activation quantization only the scales are trained.

The float model (the teacher) runs alongside: memory is the float model plus the quantized model plus one
batch of training activations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from abqllm.errors import AbqError
from abqllm.methods.block_tuning import stored_log_scale
from abqllm.nn.qlinear import QuantLinear
from abqllm.quant import primitives as P

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class E2ETuning:
    epochs: int = 2          # passes over the training windows
    lr: float = 1e-3         # Adam step on log-scales / log-norm-weights (about 0.1% per step)
    batch: int = 4           # windows per step
    holdout: float = 0.125   # fraction of the windows held out to choose the epoch; 0: keep the last epoch
    norms: bool = True       # also train the norm weights (not with static activation ranges)

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise AbqError(f"end-to-end tuning epochs must be a whole number >= 1, got {self.epochs!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise AbqError(f"end-to-end tuning lr must be a positive number, got {self.lr!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise AbqError(f"end-to-end tuning batch must be a whole number >= 1, got {self.batch!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) \
                or not 0.0 <= self.holdout < 1.0:
            raise AbqError(f"end-to-end tuning holdout must be a fraction in [0, 1) (0: none), got {self.holdout!r}")


class _TunableLinear(nn.Module):
    """Stands in for a QuantLinear during tuning: the same arithmetic (online Hadamard, activation fake
    quantization, s * (u - z)) written with torch ops, so the gradient reaches the scales."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.q = q
        self.group_size = q.spec.weight.group_size
        self.register_buffer("centred", (q.codes().float() - P.expand_groups(q.zeros.float(), q.in_features,
                                                                               self.group_size)))
        self.register_buffer("scale0", q.scales.float())
        self.theta = nn.Parameter(torch.zeros_like(self.scale0))

    def scales(self) -> torch.Tensor:
        return self.scale0 * self.theta.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q.rotated_input(x)
        act = self.q.spec.act
        if not act.is_float:
            scale, zero = self.q.act_qparams(x.float())
            x = P.fake_quant_act(x, act, scale, zero)
        w = self.centred * P.expand_groups(self.scales(), self.q.in_features, self.group_size)
        return F.linear(x, w.to(x.dtype), self.q.bias)


def _norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The 1-D weights of the normalisation layers (RMSNorm / LayerNorm), by parameter name."""
    out = {}
    for mname, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1 and "norm" in type(mod).__name__.lower():
            out[f"{mname}.weight" if mname else "weight"] = w
    return out


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), in float32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def tune_end_to_end(model: nn.Module, teacher: nn.Module, calib_ids: torch.Tensor, cfg: E2ETuning = E2ETuning(),
                    seed: int = 0, progress: bool = True) -> dict:
    """Train `model`'s QuantLinear scales (and norm weights) in place against `teacher`'s logits on `calib_ids`
    [n, L]. Returns a report: held-out KL per epoch, the epoch kept, seconds, parameter count."""
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise AbqError("end-to-end tuning needs a quantized model (no QuantLinear layers found); quantize first")
    if calib_ids.dim() != 2 or calib_ids.shape[0] < 2:
        raise AbqError(f"end-to-end tuning needs at least 2 calibration windows [n, L], got {tuple(calib_ids.shape)}")
    if model.config.vocab_size != teacher.config.vocab_size:
        raise AbqError(f"the float model's vocabulary ({teacher.config.vocab_size}) is not the quantized model's "
                       f"({model.config.vocab_size}); pass the float model this checkpoint was quantized from")
    static_act = any(hasattr(q, "act_scale") for q in quant.values())
    dev = next(model.parameters()).device
    n = calib_ids.shape[0]
    gen = torch.Generator().manual_seed(seed)
    held = min(n - 1, max(1, round(n * cfg.holdout))) if cfg.holdout else 0
    order = torch.randperm(n, generator=gen)
    judge, train = (order[:held], order[held:]) if held else (order, order)

    was_training = model.training
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    tunable = {name: _TunableLinear(q).to(dev) for name, q in quant.items()}
    for name, t in tunable.items():
        model.set_submodule(name, t)
    norms = {} if not cfg.norms or static_act else _norm_weights(model)
    base = {name: w.detach().clone() for name, w in norms.items()}
    phi = {name: torch.zeros_like(w, requires_grad=True) for name, w in norms.items()}
    t0 = time.perf_counter()
    try:
        model.eval()  # no dropout; gradients flow all the same
        teacher.eval()

        def logits(ids):  # norm weights as functions of phi, so autograd reaches them
            weights = {name: base[name] * phi[name].exp() for name in norms}
            return functional_call(model, weights, (ids,)).logits

        def step_loss(idx):
            ids = calib_ids[idx].to(dev)
            with torch.no_grad():
                target = teacher(ids).logits
            return _kl(logits(ids), target)

        def held_kl():
            with torch.no_grad():
                total = 0.0
                for idx in judge.split(cfg.batch):
                    ids = calib_ids[idx].to(dev)
                    total += _kl(logits(ids), teacher(ids).logits).item() * len(idx)
            return total / len(judge)

        def snapshot():  # as stored: scales on the float16 grid
            with torch.no_grad():
                for t in tunable.values():
                    t.theta.copy_(stored_log_scale(t.scale0, t.theta))
            return ({k: t.theta.detach().clone() for k, t in tunable.items()},
                    {k: v.detach().clone() for k, v in phi.items()})

        def restore(snap):
            with torch.no_grad():
                for k, v in snap[0].items():
                    tunable[k].theta.copy_(v)
                for k, v in snap[1].items():
                    phi[k].copy_(v)

        curve = [held_kl()]
        log.info("e2e: %s KL before tuning %.5f (%d windows)", "held-out" if held else "calibration", curve[0],
                 len(judge))
        best, best_snap, best_epoch = curve[0], snapshot(), 0
        opt = torch.optim.Adam([*(t.theta for t in tunable.values()), *phi.values()], lr=cfg.lr)
        steps = (len(train) + cfg.batch - 1) // cfg.batch
        for epoch in range(1, cfg.epochs + 1):
            perm = train[torch.randperm(len(train), generator=gen)]
            running = 0.0
            for i, idx in enumerate(perm.split(cfg.batch)):
                loss = step_loss(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += loss.item()
                if progress and (i + 1) % max(1, steps // 4) == 0:
                    log.info("e2e epoch %d: step %d/%d, train KL %.5f", epoch, i + 1, steps, running / (i + 1))
            raw = ({k: t.theta.detach().clone() for k, t in tunable.items()},
                   {k: v.detach().clone() for k, v in phi.items()})
            snap = snapshot()
            cur = held_kl()
            curve.append(cur)
            log.info("e2e epoch %d: train KL %.5f, %s KL %.5f (%.0f s)", epoch, running / steps,
                     "held-out" if held else "calibration", cur, time.perf_counter() - t0)
            if cur < best or not held and epoch == cfg.epochs:
                best, best_snap, best_epoch = cur, snap, epoch
            restore(raw)  # training goes on from the unrounded values
        restore(best_snap)
        with torch.no_grad():
            for name, w in norms.items():
                w.copy_(base[name] * phi[name].exp())
            for t in tunable.values():
                t.q.scales.copy_(t.scales().half())
    finally:
        for name, t in tunable.items():
            model.set_submodule(name, t.q)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    n_params = sum(t.theta.numel() for t in tunable.values()) + sum(v.numel() for v in phi.values())
    report = {"settings": asdict(cfg), "calib_shape": list(calib_ids.shape), "seed": seed,
              "held_out_windows": held, "kl_curve": [float(f"{v:.6g}") for v in curve],
              "kl_before": curve[0], "kl_after": best, "epoch_kept": best_epoch, "parameters": n_params,
              "seconds": round(time.perf_counter() - t0, 1)}
    qc = getattr(model.config, "quantization_config", None)
    if isinstance(qc, dict):  # provenance in the checkpoint
        qc["e2e_tuning"] = {k: v for k, v in report.items() if k != "seconds"}
    return report
