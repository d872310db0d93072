"""Triton kernels of the dense prefill path (kernels/dense_prefill.py): expand k-packed weights into a dense
matrix that cuBLAS multiplies, and the integer epilogue after `torch._int_mm`.

Imported lazily (importing it imports triton). Plain kernels with no helpers, so they run compiled on a GPU and
in Triton's CPU interpreter alike.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kp_expand_kernel(qw_ptr, sw_ptr, zw_ptr, out_ptr, cs_ptr, N, K, SEG, NW,
                     BITS: tl.constexpr, PER: tl.constexpr, PER_P: tl.constexpr, WPG: tl.constexpr,
                     GROUPED: tl.constexpr, INT_OUT: tl.constexpr, COL_SUMS: tl.constexpr,
                     BN: tl.constexpr, BW: tl.constexpr):
    """One program expands a [BW, BN] tile of words (qweight_t rows, N-contiguous) into the BW * PER rows of
    K they hold, written to out [K, N] row-major, so loads and stores both run along N.

    Float output (INT_OUT False): s * (u - z) in out's dtype, the layer's dequantized weight, transposed.
    Integer output: int8 u - c with c = z (exact for BITS <= 7: |u - z| <= 127) or c = 128 for BITS = 8
    (the launcher folds 128 - z into the epilogue). COL_SUMS adds each column's sum of u - c into cs [N]
    (int32 atomics, exact and order-free): the activation offset term needs it.
    WPG is a compile-time constant for groups; per channel (GROUPED False) there is one segment of NW words."""
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    rw = pid_w * BW + tl.arange(0, BW)
    w_ok = rw < NW
    words = tl.load(qw_ptr + rw[:, None].to(tl.int64) * N + rn[None, :], mask=w_ok[:, None] & n_ok[None, :],
                    other=0)
    j = tl.arange(0, PER_P)
    # slots past PER (odd widths: 10 codes in 16 slots) repeat the last shift and are masked at the store
    shift = tl.minimum(j, PER - 1) * BITS
    # arithmetic shift of a negative word sign-extends, but the mask keeps only the code's own bits
    codes = (words[:, None, :] >> shift[None, :, None]) & ((1 << BITS) - 1)  # [BW, PER_P, BN]
    if GROUPED:
        g = rw // WPG
        slot0 = (rw - g * WPG) * PER  # the word's first code inside its segment
    else:
        g = rw * 0
        slot0 = rw * PER
    in_seg = slot0[:, None] + j[None, :]  # [BW, PER_P]
    k = g[:, None] * SEG + in_seg
    k_ok = (j[None, :] < PER) & (in_seg < SEG) & (k < K) & w_ok[:, None]
    meta = g[:, None].to(tl.int64) * N + rn[None, :]  # [BW, BN]
    meta_ok = w_ok[:, None] & n_ok[None, :]
    z = tl.load(zw_ptr + meta, mask=meta_ok, other=0).to(tl.int32)
    ok = k_ok[:, :, None] & n_ok[None, None, :]
    dst = out_ptr + k[:, :, None].to(tl.int64) * N + rn[None, None, :]
    if INT_OUT:
        if BITS == 8:
            v = codes - 128
        else:
            v = codes - z[:, None, :]
        tl.store(dst, v.to(tl.int8), mask=ok)
        if COL_SUMS:
            part = tl.sum(tl.sum(tl.where(ok, v, 0), axis=1), axis=0)
            tl.atomic_add(cs_ptr + rn, part, mask=n_ok)
    else:
        s = tl.load(sw_ptr + meta, mask=meta_ok, other=0.0).to(tl.float32)
        v = (codes - z[:, None, :]).to(tl.float32) * s[:, None, :]
        tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def int_epilogue_kernel(acc_ptr, sx_ptr, ax_ptr, rx_ptr, sw_ptr, zw_ptr, cs_ptr, bias_ptr, y_ptr, M, N, K,
                        stride_ym, CENTER_W: tl.constexpr, A_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr):
    """y = s_x s_w * sum_k (xq + a)(w' + d) + bias from acc = xq . w' (int32, torch._int_mm), where
    u_x - z_x = xq + a (act_quant) and u_w - z_w = w' + d with d = 128 - z_w when CENTER_W (8-bit weights), else
    d = 0. Expanded: acc + d * rowsum(xq) + a * (colsum(w') + d * K), summed in int64 (exact), then one
    float32 rounding."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    ok = m_ok[:, None] & n_ok[None, :]
    total = tl.load(acc_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], mask=ok, other=0).to(tl.int64)
    d = tl.zeros((BN,), tl.int64)
    if CENTER_W:
        d = 128 - tl.load(zw_ptr + rn, mask=n_ok, other=0).to(tl.int64)
        rx = tl.load(rx_ptr + rm, mask=m_ok, other=0).to(tl.int64)
        total += rx[:, None] * d[None, :]
    if A_OFFSET:
        a = tl.load(ax_ptr + rm, mask=m_ok, other=0).to(tl.int64)
        cs = tl.load(cs_ptr + rn, mask=n_ok, other=0).to(tl.int64)
        total += a[:, None] * (cs + d * K)[None, :]
    sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = total.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
