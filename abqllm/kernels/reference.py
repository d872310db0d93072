"""Reference linear kernels: the CPU path and the ground truth for every fast kernel.

With activation codes x (per-token scale s_x, zero z_x) and weight codes w (per-group scale s_w,
zero z_w), over each group g of K_g real columns (ABQ.md section 5):

    x_hat . w_hat = s_x * s_w * (x.w - z_x * sum(w) - z_w * sum(x) + K_g * z_x * z_w)

`integer_dot` computes the raw x.w of codes (exact in float64: |x.w| < 2^16 * K << 2^53);
`bitplane_dot` computes the same thing as sum_i sum_j 2^(i+j) popcount(X_i AND W_j) over bit
planes, as binary tensor-core kernels do; `zero_point_epilogue` applies the formula above.
Padded columns hold code 0 on both sides, so they add nothing to x.w, sum(w) or sum(x).
"""

from __future__ import annotations

import torch

from abqllm.formats.packing import WORD, pack_bitplanes
from abqllm.kernels.registry import register
from abqllm.quant import primitives as P


def _group_view(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[R, K] -> [R, G, gs] with zero padding."""
    r, k = t.shape
    gs = k if group_size == 0 else group_size
    g = P.num_groups(k, group_size)
    return torch.nn.functional.pad(t, (0, g * gs - k)).reshape(r, g, gs)


def integer_dot(x_codes: torch.Tensor, w_codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """[M, K] x [N, K] codes -> per-group raw dot products [M, N, G], float64 (exact)."""
    xg = _group_view(x_codes.double(), group_size)
    wg = _group_view(w_codes.double(), group_size)
    return torch.einsum("mgk,ngk->mng", xg, wg)


_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int32 word (byte lookup; torch has no popcount)."""
    b = words.contiguous().view(torch.uint8).reshape(*words.shape, 4).long()
    return _POPCOUNT8.to(words.device)[b].sum(-1)


def bitplane_dot(x_codes: torch.Tensor, x_bits: int, w_codes: torch.Tensor, w_bits: int,
                 group_size: int) -> torch.Tensor:
    """Same result as integer_dot, from p*q binary AND+popcount products of bit planes.

    Needs group boundaries on word boundaries: group_size 0 (per channel) or a multiple of 32.
    """
    if group_size % WORD:
        raise ValueError(f"bit-plane products need group_size % {WORD} == 0, got {group_size}")
    xp = pack_bitplanes(x_codes.to(torch.uint8), x_bits)  # [q, M, W]
    wp = pack_bitplanes(w_codes.to(torch.uint8), w_bits)  # [p, N, W]
    words_per_group = xp.shape[-1] if group_size == 0 else group_size // WORD
    g = P.num_groups(x_codes.shape[1], group_size)
    m, n = x_codes.shape[0], w_codes.shape[0]
    out = torch.zeros(m, n, g, dtype=torch.float64, device=x_codes.device)
    for i in range(x_bits):
        for j in range(w_bits):
            both = xp[i].unsqueeze(1) & wp[j].unsqueeze(0)  # [M, N, W]
            pc = popcount32(both)
            pc = torch.nn.functional.pad(pc, (0, g * words_per_group - pc.shape[-1]))
            out += float(2 ** (i + j)) * pc.reshape(m, n, g, words_per_group).sum(-1).double()
    return out


def zero_point_epilogue(dot: torch.Tensor, x_codes: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor,
                        w_codes: torch.Tensor, sw: torch.Tensor, zw: torch.Tensor, group_size: int) -> torch.Tensor:
    """dot [M, N, G] raw code products -> float64 [M, N] outputs (before bias)."""
    k = x_codes.shape[1]
    kg = torch.tensor([e - s for s, e in P.group_bounds(k, group_size)], dtype=torch.float64, device=dot.device)
    sum_x = _group_view(x_codes.double(), group_size).sum(-1)  # [M, G]
    sum_w = _group_view(w_codes.double(), group_size).sum(-1)  # [N, G]
    zx, sx = zx.double().reshape(-1, 1, 1), sx.double().reshape(-1, 1)
    zw, sw = zw.double().unsqueeze(0), sw.double().unsqueeze(0)  # [1, N, G]
    acc = dot - zx * sum_w.unsqueeze(0) - zw * sum_x.unsqueeze(1) + kg * zx * zw
    return sx * (acc * sw).sum(-1)


def _linear_integer(layer, x: torch.Tensor, dot_fn) -> torch.Tensor:
    spec = layer.spec
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    w_codes = layer.codes()
    if spec.act.is_float:
        y = x2.double() @ layer.dequantized_weight(torch.float64).T
    else:
        sx, zx = layer.act_qparams(x2)
        sx, zx = sx.expand(x2.shape[0], 1), zx.expand(x2.shape[0], 1)
        x_codes = P.quantize_act(x2, spec.act, sx, zx)
        dot = dot_fn(x_codes, w_codes)
        y = zero_point_epilogue(dot, x_codes, sx, zx, w_codes, layer.scales, layer.zeros.float(),
                                spec.weight.group_size)
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


@register("linear", "reference", priority=0)
def linear_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """Exact integer engine: integer products of codes + zero-point epilogue, float64."""
    return _linear_integer(layer, x, lambda xc, wc: integer_dot(xc, wc, layer.spec.weight.group_size))


def _bitplane_ok(layer, device) -> bool:
    return layer.spec.weight.group_size % WORD == 0 and not layer.spec.act.is_float


@register("linear", "bitplane", priority=-10, supports=_bitplane_ok)
def linear_bitplane(layer, x: torch.Tensor) -> torch.Tensor:
    """ABQ's binary formulation (p*q AND+popcount products); slow, for checking on small shapes."""
    spec = layer.spec
    return _linear_integer(layer, x, lambda xc, wc: bitplane_dot(xc, spec.act.bits, wc, spec.weight.storage_bits,
                                                                 spec.weight.group_size))


@register("linear", "torch", priority=10)
def linear_dequant(layer, x: torch.Tensor) -> torch.Tensor:
    """Fake-quant activations, cached dequantized weight, one float matmul in x's dtype.

    Equal to the reference up to float rounding; the default on CPU until a packed CPU kernel exists.
    """
    xq = x
    if not layer.spec.act.is_float:
        sx, zx = layer.act_qparams(x)
        xq = P.fake_quant_act(x, layer.spec.act, sx, zx)
    return torch.nn.functional.linear(xq, layer.dequantized_weight(x.dtype), layer.bias)


@register("act_quant", "reference", priority=0, supports=lambda layer, device: not layer.spec.act.is_float)
def act_quant_reference(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (codes uint8 [M, K], scale f32 [M], zero f32 [M]) of the layer's activation quantizer."""
    x2 = x.reshape(-1, x.shape[-1])
    s, z = layer.act_qparams(x2)
    s, z = s.float().expand(x2.shape[0], 1), z.float().expand(x2.shape[0], 1)
    return P.quantize_act(x2, layer.spec.act, s, z).to(torch.uint8), s.reshape(-1).clone(), z.reshape(-1).clone()
