"""The dense prefill path: expand the k-packed weights, then let cuBLAS do the GEMM.

At large M a fused low-bit GEMM has to match cuBLAS at its own game (TMA, wgmma, warp specialization) while
also unpacking; on the H100 the published fused kernels stay at 0.35-0.65x of fp16 cuBLAS from M = 256 up
(../shared/KERNELS.md, read off gemlite's charts). Expanding the weights costs one pass over N x K outputs
(at 8192^2: 134 MB of fp16 writes, about 50 us at 3 TB/s) beside a GEMM of 2 M N K operations (M = 2048:
275 GFLOP, about 420 us at 660 TFLOP/s; both rates are the ceilings the H100 run measured,
benchmarks/results/gpu_h100_2026-11-28.md), so the path should reach about 0.9x of cuBLAS fp16 for A16 and about
0.75x of `torch._int_mm` for per-channel A8 (expand, act_quant, rowsum and epilogue passes around it).
Those are predictions; benchmarks/gpu/kp_check.py times them against the fused kernels.

Paths, by scheme:
- A16: W_hat = s (u - z) in x's dtype, [K, N]; y = x @ W_hat (+ bias) in one addmm.
- A2..A8, per-channel weights: int8 codes w' = u - c (c = z below 8 bits, 128 at 8 bits) and int8 activations
  from act_quant; torch._int_mm (int32 accumulation) and int_epilogue_kernel for the zero points and scales.
  Exact up to the final float32 rounding, like the reference.
- A2..A8 with weight groups: a per-group scale cannot ride one integer GEMM, so the activations are
  fake-quantized (s_x (xq + a), in x's dtype) and W_hat as for A16: the 'torch' kernel's arithmetic.
  Also the fallback where torch._int_mm's shape rules (M > 16, K and N multiples of 8) do not hold.

The expanded weight is a temporary of N x K elements (2 bytes for float, 1 for int8) per call, taken from and
returned to torch's caching allocator. Device: CUDA, or the CPU inside Triton's interpreter.
"""

from __future__ import annotations

import torch

from abqllm.kernels import kpacked as KP
from abqllm.kernels.kpacked_linear import _per_p, _prologue, _supports, layer_kp_args, rows
from abqllm.kernels.registry import register

# Rows from which the 'triton' and 'triton-kpacked' linear kernels take this path on CUDA; None: never (`auto`
# keeps qlinear_kernel / kp_gemm). Off until a GPU run has checked and timed it: a kernel no GPU has run does not
# become the default for every prefill. The intended value is 256, the switch point of vLLM's Machete;
# kp_check.py's large-M section times both sides of it. Set it (or name 'triton-dense') to use the path now.
DENSE_MIN_M: int | None = None
PLANNED_MIN_M = 256
# int32 accumulation of int8 x int8 products is exact while 128 * 128 * K < 2^31.
INT_MM_MAX_K = 1 << 17


def _kernels():
    from abqllm.kernels import triton_dense  # imports triton
    return triton_dense


def expand_tile(bits: int, interpret: bool) -> tuple[int, int]:
    """(BN, BW): about 64 rows of K by 64 (interpreter: 32) columns per program."""
    bn = 32 if interpret else 64
    return bn, max(1, 64 // _per_p(bits))


def expand_kpacked(qweight_t: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor, in_features: int,
                   bits: int, group_size: int, dtype: torch.dtype, col_sums: bool = False,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The k-packed weights as a dense [K, N] matrix: s (u - z) for a float dtype, or int8 u - c (c = z, or 128
    at 8 bits; per channel only) for torch.int8. Returns (matrix, column sums of the int8 matrix or None)."""
    from abqllm.kernels.triton_linear import interpreting

    k, n, nw = in_features, qweight_t.shape[1], qweight_t.shape[0]
    int_out = dtype == torch.int8
    if int_out and group_size:
        raise ValueError("int8 expansion needs per-channel weights (group_size 0): a group's scale cannot be "
                         "applied after one integer GEMM")
    if out is None:
        out = torch.empty(k, n, dtype=dtype, device=qweight_t.device)
    elif out.shape != (k, n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape ({k}, {n})")
    cs = torch.zeros(n, dtype=torch.int32, device=qweight_t.device) if int_out and col_sums else None
    if k == 0 or n == 0:
        return out, cs
    bn, bw = expand_tile(bits, interpreting())
    seg = KP.segment_length(k, group_size)
    _kernels().kp_expand_kernel[(-(-n // bn), -(-nw // bw))](
        qweight_t, scales_t, zeros_t, out, cs if cs is not None else qweight_t, n, k, seg, nw,
        BITS=bits, PER=KP.codes_per_word(bits), PER_P=_per_p(bits),
        WPG=KP.words_per_segment(k, group_size, bits) if group_size else 0, GROUPED=group_size > 0,
        INT_OUT=int_out, COL_SUMS=cs is not None, BN=bn, BW=bw, num_warps=4)
    return out, cs


def int_mm_ok(m: int, n: int, k: int) -> bool:
    """torch._int_mm's cuBLAS shape rules (as torchao's safe_int_mm states them) and exact int32 sums."""
    return m > 16 and k % 8 == 0 and n % 8 == 0 and 0 < k <= INT_MM_MAX_K


def dense_qlinear(x: torch.Tensor, qweight_t: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
                  bias: torch.Tensor | None, act_scale: torch.Tensor | None, act_zero: torch.Tensor | None,
                  in_features: int, bits: int, group_size: int, act_bits: int, act_symmetric: bool,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """y = Q_a(x) @ W^T + bias on the k-packed layout through a cuBLAS GEMM (see the module docstring)."""
    from abqllm.kernels.triton_linear import act_center_exact, interpreting

    out_shape, m, y, a_in, sx, ax = _prologue(x, qweight_t, scales_t, in_features, bits, group_size, act_bits,
                                              act_symmetric, act_scale, act_zero, out, "dense_qlinear")
    if m == 0:
        return y.reshape(out_shape)
    k, n = in_features, qweight_t.shape[1]
    int_path = act_bits != 16
    if int_path and not group_size and int_mm_ok(m, n, k):
        a_offset = not act_center_exact(act_bits, act_symmetric)
        w8, cs = expand_kpacked(qweight_t, scales_t, zeros_t, k, bits, 0, torch.int8, col_sums=a_offset)
        acc = torch._int_mm(a_in, w8)
        del w8
        center_w = bits == 8
        rx = a_in.sum(1, dtype=torch.int32) if center_w else acc  # unused unless CENTER_W
        bm, bn = (16, 32) if interpreting() else (32, 128)
        _kernels().int_epilogue_kernel[(-(-m // bm), -(-n // bn))](
            acc, sx, ax, rx, scales_t, zeros_t, cs if cs is not None else acc, bias if bias is not None else sx,
            y, m, n, k, y.stride(0), CENTER_W=center_w, A_OFFSET=a_offset, HAS_BIAS=bias is not None,
            BM=bm, BN=bn, num_warps=4)
        return y.reshape(out_shape)
    x2 = a_in  # the rows of x, or for integer activations their codes, fake-quantized here: s_x (xq + a)
    if int_path:
        x2 = ((a_in.float() + ax.unsqueeze(1).float()) * sx.unsqueeze(1)).to(x.dtype)
    w_hat, _ = expand_kpacked(qweight_t, scales_t, zeros_t, k, bits, group_size, x.dtype)
    if bias is not None:
        torch.addmm(bias.to(x.dtype), x2, w_hat, out=y)
    else:
        torch.mm(x2, w_hat, out=y)
    return y.reshape(out_shape)


def use_dense(x: torch.Tensor) -> bool:
    """Whether the 'triton' and 'triton-kpacked' kernels take this path (CUDA prefill from DENSE_MIN_M rows)."""
    return DENSE_MIN_M is not None and x.device.type == "cuda" and rows(x) >= DENSE_MIN_M


@register("linear", "triton-dense", priority=7, supports=_supports, layout="kpacked")
def linear_triton_dense(layer, x: torch.Tensor) -> torch.Tensor:
    """Every M through the dense path (explicit choice; `auto` takes it from DENSE_MIN_M rows on CUDA when set)."""
    from abqllm.kernels import custom_ops
    return custom_ops.dense_qlinear(x, **layer_kp_args(layer))


def aot_compile_expand(n: int, k: int, bits: int, group_size: int, dtype: torch.dtype = torch.float16,
                       col_sums: bool = False, arch: int = 90):
    """Compile the kp_expand_kernel launch that expand_kpacked would make, for sm_<arch>, without a GPU."""
    from abqllm.kernels.kpacked_linear import _aot_compile
    from abqllm.kernels.triton_linear import _TRITON_TYPE
    int_out = dtype == torch.int8
    bn, bw = expand_tile(bits, False)
    ptr = dict(qw_ptr="*i32", sw_ptr="*fp16", zw_ptr="*u8", out_ptr="*i8" if int_out else f"*{_TRITON_TYPE[dtype]}",
               cs_ptr="*i32")
    const = dict(BITS=bits, PER=KP.codes_per_word(bits), PER_P=_per_p(bits),
                 WPG=KP.words_per_segment(k, group_size, bits) if group_size else 0, GROUPED=group_size > 0,
                 INT_OUT=int_out, COL_SUMS=int_out and col_sums, BN=bn, BW=bw)
    return _aot_compile(_kernels().kp_expand_kernel, ptr, ("N", "K", "SEG", "NW"), const, 4, 1, arch)


def aot_compile_int_epilogue(center_w: bool, a_offset: bool, has_bias: bool, y_dtype: torch.dtype = torch.float16,
                             arch: int = 90):
    """Compile int_epilogue_kernel for sm_<arch> without a GPU."""
    from abqllm.kernels.kpacked_linear import _aot_compile
    from abqllm.kernels.triton_linear import _TRITON_TYPE
    yt = _TRITON_TYPE[y_dtype]
    ptr = dict(acc_ptr="*i32", sx_ptr="*fp32", ax_ptr="*i32", rx_ptr="*i32", sw_ptr="*fp16", zw_ptr="*u8",
               cs_ptr="*i32", bias_ptr=f"*{yt}", y_ptr=f"*{yt}")
    const = dict(CENTER_W=center_w, A_OFFSET=a_offset, HAS_BIAS=has_bias, BM=32, BN=128)
    return _aot_compile(_kernels().int_epilogue_kernel, ptr, ("M", "N", "K", "stride_ym"), const, 4, 1, arch)
