"""ABQ-LLM's math as pure functions (ABQ.md sections 2-4).

Each transform is written once, as a differentiable function of its parameters; calibration calls
it under autograd and the final fold calls the same function without gradients.

Parameters of one block (all tensors, so a result is a plain dict that can be saved and re-applied):
- `smooth.<k>`       log of a per-channel scale for LinearGroup k (norm -> linears, linear -> linear);
                     the producer is divided by s, the consumers' input columns multiplied by s
- `clip.<linear>.lo`, `clip.<linear>.hi`   learnable weight clipping logits [N, G] (sigmoid; 4 at start)
- `comp.<linear>.a`, `comp.<linear>.b`     distribution compensation W + a b^T (a = 0, b = 1 at start)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from abqllm.methods.transforms import fold_group
from abqllm.models.arch import ArchSpec, LinearGroup
from abqllm.quant import primitives as P
from abqllm.spec import WeightSpec

CLIP_INIT = 4.0


def group_key(i: int) -> str:
    return f"smooth.{i}"


def transform_block(weights: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                    groups: list[tuple[str, LinearGroup]], arch: ArchSpec,
                    dims: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Float block tensors (names as in block.named_parameters()) -> transformed tensors.

    `groups` pairs each scale's key in `params` with its LinearGroup. Only tensors that change are
    returned. Exact in real arithmetic: the transformed float block computes the same function.
    """
    head_dim = dims[2]
    out = dict(weights)
    for key, g in groups:  # the same fold the baselines use, here under autograd
        if key in params and g.prev is not None:
            out.update(fold_group(out, g, params[key].exp(), arch.norm_plus_one, head_dim))
    for key in params:  # distribution compensation, after the transforms, before quantization
        if key.startswith("comp.") and key.endswith(".a"):
            lin = key[len("comp."): -len(".a")]
            out[f"{lin}.weight"] = out[f"{lin}.weight"] + params[key] @ params[f"comp.{lin}.b"]
    return {k: v for k, v in out.items() if v is not weights.get(k)}


def clip_range(w: torch.Tensor, spec: WeightSpec, lo_logit: torch.Tensor, hi_logit: torch.Tensor):
    """Learnable clipping: [sigmoid(lo) * min, sigmoid(hi) * max] per channel/group.

    The min/max keep their gradient: with straight-through rounding, the range is the only path by
    which the equivalent-transform scales see the quantization error.
    """
    gmin, gmax = P.group_minmax(w, spec.group_size)
    return torch.sigmoid(lo_logit) * gmin, torch.sigmoid(hi_logit) * gmax


def fake_quant_clipped(w: torch.Tensor, spec: WeightSpec, lo_logit: torch.Tensor, hi_logit: torch.Tensor):
    lo, hi = clip_range(w, spec, lo_logit, hi_logit)
    return P.fake_quant_weight(w, spec, lo, hi)


# ---- losses -----------------------------------------------------------------------------------

def cosine_term(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """-log |mean over tokens of cos(y, t)| (cosine over the hidden dimension)."""
    cos = F.cosine_similarity(y.float(), t.float(), dim=-1).mean()
    return -torch.log(cos.abs().clamp(min=1e-8))


def attention_kl(a_q: torch.Tensor, a_fp: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """|KL(Aq || Afp)| + |KL(Afp || Aq)| of head-averaged attention maps [B, L, L], mean over queries."""
    lq, lf = torch.log(a_q + eps), torch.log(a_fp + eps)
    kl_qf = (a_q * (lq - lf)).sum(-1).mean()
    kl_fq = (a_fp * (lf - lq)).sum(-1).mean()
    return kl_qf.abs() + kl_fq.abs()


def token_weights(t: torch.Tensor) -> torch.Tensor:
    """[..., L] weights min(1, median / E[t^2] of the token): a token whose output is far larger than the
    typical one (an attention sink: SmolLM2's block 11 puts ~27k on the first token of every window, 100x
    any other) counts like a typical token in the MSE instead of owning it. Typical tokens keep weight 1."""
    e = t.detach().float().pow(2).mean(-1)
    med = e.flatten().median().clamp_min(1e-12)
    return (med / e.clamp_min(1e-12)).clamp(max=1.0)


def weighted_mse(y: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return F.mse_loss(y, t)
    return ((y.float() - t.float()).pow(2).mean(-1) * w).sum() / w.numel()


def abq_loss(y_q: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, a_q: torch.Tensor | None,
             a_fp: torch.Tensor | None, use_mse: bool = True, use_cos: bool = True,
             use_attn: bool = True, token_weight: str = "none") -> tuple[torch.Tensor, dict[str, float]]:
    """token_weight: "none" (plain MSE, the paper's) or "sink" (see token_weights; from the float target t1)."""
    terms: dict[str, torch.Tensor] = {}
    if use_mse:
        w = token_weights(t1) if token_weight == "sink" else None
        terms["mse"] = weighted_mse(y_q, t1, w) + weighted_mse(y_q, t2, w)
    if use_cos:
        terms["cos"] = cosine_term(y_q, t1) + cosine_term(y_q, t2)
    if use_attn and a_q is not None and a_fp is not None:
        terms["attn"] = attention_kl(a_q, a_fp)
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def smooth_init(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """log of SmoothQuant's s = max|X|^alpha / max|W|^(1 - alpha), guarded against zeros."""
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(1e-3, 1e3).log()


def clip_grid_init(w: torch.Tensor, spec: WeightSpec, col_weight: torch.Tensor | None = None,
                   ratios: torch.Tensor | None = None) -> torch.Tensor:
    """Clipping logits [N, G] that minimise the (input-weighted) weight-quantization error per group.

    The paper starts every clip at sigmoid(4) = 0.98; with a short CPU budget the optimiser cannot
    walk far from there, so we start from the best shrink ratio on a grid instead. `col_weight`
    [K] weighs column errors by the mean squared input of that column (a diagonal Hessian).
    """
    ratios = torch.linspace(1.0, 0.3, 15) if ratios is None else ratios
    gmin, gmax = P.group_minmax(w, spec.group_size)
    cw = torch.ones(w.shape[1], device=w.device) if col_weight is None else col_weight.to(w.device)
    best_err = torch.full_like(gmin, float("inf"))
    best = torch.ones_like(gmin)
    for r in ratios.tolist():
        q = P.fake_quant_weight(w, spec, gmin * r, gmax * r)
        err = _group_sum(((q - w) ** 2) * cw, spec.group_size)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return torch.logit(best.clamp(max=torch.sigmoid(torch.tensor(CLIP_INIT)).item()))


def _group_sum(t: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = t.shape
    if group_size == 0:
        return t.sum(1, keepdim=True)
    g = P.num_groups(k, group_size)
    return F.pad(t, (0, g * group_size - k)).reshape(n, g, group_size).sum(-1)
