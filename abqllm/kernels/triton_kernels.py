"""Triton kernels for WpAq linear layers (imported lazily by triton_linear.py: importing it imports triton).

Two kernels, no device-function helpers (each kernel is one function, so the same source runs compiled
on a GPU and, with TRITON_INTERPRET=1 set before triton is imported, in Triton's CPU interpreter):

`act_quant_kernel`: one program per row of x [M, K]. Per-token asymmetric/symmetric (or static
per-tensor) quantization with exactly the arithmetic of `quant.primitives.act_qparams/quantize_act`
(IEEE division, round half to even), so the codes equal the reference codes bit for bit. Writes
int8 codes centred by `c` (xq = u - c), the scale s and the offset a = c - z of every row:
- c = z (a = 0) when u - z fits int8: q <= 7, or q = 8 symmetric (z = 128);
- c = 128 for q = 8 asymmetric (a = 128 - z; the linear kernel adds the a * sum(w) term).

`qlinear_kernel`: y = x @ W^T for packed weights, computed transposed (acc[BN, BM] = W_tile @ x_tile^T,
weights on the left as KERNELS.md suggests for register-sourced MMA). Weight codes are read straight from
the plain bitstream layout (formats/packing.py): code k of a row sits at bits [k*b, k*b + b) of the row's
little-endian bit string, i.e. word (k*b) >> 5, shift (k*b) & 31, spilling into the next word when
shift + b > 32 (b = 3, 5, 6, 7). Integer path (q <= 8, int8 operands, int32 accumulation):
    w' = w - z_w  (b <= 7 bits: fits int8, offset bw = 0)  or  w - 128 (b = 8: bw = 128 - z_w)
    sum_k (x - z_x)(w - z_w) = sum x'w' + bw * sum x' + a * sum w' + Kc * a * bw     (ABQ.md section 5)
over each segment of columns that shares one weight scale (a group, or a slice of K for per-channel
scales), then acc += s_w * segment in float32, and y = s_x * acc + bias at the end. Float path (A16):
x (fp16/bf16/fp32) times the integer-valued (w - z_w) in x's dtype (exact), fp32 accumulation, s_w per
segment. The same kernel serves decode (BM = 16 with tl.dot, or BM = 1 on CUDA cores, split-K with fp32
atomics) and prefill (large BM/BN tiles, grouped program order for L2 reuse, SPLIT_K = 1).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def act_quant_kernel(x_ptr, xq_ptr, sx_ptr, ax_ptr, s_static_ptr, z_static_ptr, K, stride_xm,
                     QMAX: tl.constexpr, HALF: tl.constexpr, SYMMETRIC: tl.constexpr, STATIC: tl.constexpr,
                     CENTER_EXACT: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = xq_ptr + row.to(tl.int64) * K
    cols = tl.arange(0, BLOCK)
    if STATIC:
        s = tl.load(s_static_ptr).to(tl.float32)
        z = tl.load(z_static_ptr).to(tl.float32)
    else:
        lo = tl.zeros((BLOCK,), tl.float32)  # starts at 0: act_qparams clamps min <= 0 <= max anyway
        hi = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, K, BLOCK):
            xv = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, xv)
            hi = tl.maximum(hi, xv)
        lo_r = tl.min(lo, axis=0)
        hi_r = tl.max(hi, axis=0)
        if SYMMETRIC:
            s = tl.maximum(tl.math.div_rn(tl.maximum(hi_r, -lo_r), (HALF - 1) * 1.0), MIN_SCALE)
            z = s * 0.0 + HALF  # a tensor, not a constexpr (the interpreter hides the difference)
        else:
            s = tl.maximum(tl.math.div_rn(hi_r - lo_r, QMAX * 1.0), MIN_SCALE)
            t = tl.math.div_rn(-lo_r, s)
            f = tl.floor(t)  # round half to even, as torch.round
            d = t - f
            odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
            z = f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)
    if CENTER_EXACT:
        c = z
    else:
        c = z * 0.0 + HALF
    for k0 in range(0, K, BLOCK):
        kmask = k0 + cols < K
        v = tl.math.div_rn(tl.load(x_row + k0 + cols, mask=kmask, other=0.0).to(tl.float32), s)
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        u = tl.minimum(tl.maximum(f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0) + z, 0.0), QMAX * 1.0)
        tl.store(q_row + k0 + cols, (u - c).to(tl.int32).to(tl.int8), mask=kmask)
    tl.store(sx_ptr + row, s)
    tl.store(ax_ptr + row, (c - z).to(tl.int32))


@triton.jit
def qlinear_kernel(x_ptr, sx_ptr, ax_ptr, qw_ptr, sw_ptr, zw_ptr, bias_ptr, y_ptr,
                   M, N, K, KW, G, stride_xm, stride_ym, K_PER_SPLIT,
                   BITS: tl.constexpr, GS: tl.constexpr, INT_PATH: tl.constexpr, W_EXACT: tl.constexpr,
                   A_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                   DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr, FLUSH_COLS: tl.constexpr, WORDS_P: tl.constexpr):
    # ---- which tile: grouped ordering (GROUP_M row blocks share the weight columns they stream)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)

    acc = tl.zeros((BN, BM), tl.float32)
    if INT_PATH:
        seg = tl.zeros((BN, BM), tl.int32)
    else:
        seg = tl.zeros((BN, BM), tl.float32)
    sx_seg = tl.zeros((BM,), tl.int32)  # sum of x' over the segment (needed when bw != 0)
    sw_seg = tl.zeros((BN,), tl.int32)  # sum of w' over the segment (needed when a != 0)
    seg_lo = k_lo
    w_row = qw_ptr + rn[:, None] * KW
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        if GS > 0:
            g = k0 // GS
        else:
            g = 0
        # ---- unpack weight codes [BN, BK]: the tile's BK*BITS/32 words of each row are contiguous (k0 is a
        # multiple of BK, itself a multiple of 32), loaded once, then expanded in registers.
        wcol = (k0 // 32) * BITS + tl.arange(0, WORDS_P)
        w_mask = n_ok[:, None] & ((wcol < KW) & (tl.arange(0, WORDS_P) < BK // 32 * BITS))[None, :]
        words = tl.load(w_row + wcol[None, :], mask=w_mask, other=0).to(tl.uint32, bitcast=True)
        if (32 % BITS) == 0:  # 32/BITS whole codes per word, code j of a word at bits [j*BITS, ...)
            shifts = (tl.arange(0, 32 // BITS) * BITS).to(tl.uint32)
            code = tl.reshape(words[:, :, None] >> shifts[None, None, :], (BN, BK))
        else:  # odd widths: gather the word holding each code's first bit and the next one (straddling codes)
            rel = tl.arange(0, BK) * BITS
            idx = tl.broadcast_to((rel >> 5)[None, :], (BN, BK))
            sh = (rel & 31).to(tl.uint32)[None, :]
            spill = (sh + BITS) > 32
            w0 = tl.gather(words, idx, axis=1)
            w1 = tl.gather(words, tl.minimum(idx + 1, WORDS_P - 1), axis=1)
            code = (w0 >> sh) | tl.where(spill, w1 << (32 - sh), 0)
        code = (code & ((1 << BITS) - 1)).to(tl.int32)
        zw = tl.load(zw_ptr + rn * G + g, mask=n_ok, other=0).to(tl.int32)
        if INT_PATH:
            if W_EXACT:
                wv = code - zw[:, None]
            else:
                wv = code - (1 << (BITS - 1))
            if A_OFFSET:
                wv = tl.where(k_ok[None, :], wv, 0)  # padded columns must not enter sum(w')
                sw_seg += tl.sum(wv, axis=1)
            if USE_DOT:
                seg += tl.dot(wv.to(tl.int8), tl.trans(x))
            else:
                seg += tl.sum(wv * x.to(tl.int32), axis=1)[:, None]
            if not W_EXACT:
                sx_seg += tl.sum(x.to(tl.int32), axis=1)
        else:
            wv = code - zw[:, None]
            if DOT_F32:
                seg += tl.dot(wv.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
            elif USE_DOT:
                seg += tl.dot(wv.to(x.dtype), tl.trans(x))
            else:
                seg += tl.sum(wv.to(tl.float32) * x.to(tl.float32), axis=1)[:, None]
        # ---- end of a segment that shares one weight scale: apply it
        end = k0 + BK
        if GS > 0:
            flush = ((end % GS) == 0) | (end >= k_hi)
        else:
            flush = ((end - seg_lo) >= FLUSH_COLS) | (end >= k_hi)
        if flush:
            sw = tl.load(sw_ptr + rn * G + g, mask=n_ok, other=0.0).to(tl.float32)
            if INT_PATH:
                tot = seg
                if not W_EXACT:
                    bw = (1 << (BITS - 1)) - zw
                    tot += bw[:, None] * sx_seg[None, :]
                if A_OFFSET:
                    a = tl.load(ax_ptr + rm, mask=m_ok, other=0)
                    tot += sw_seg[:, None] * a[None, :]
                    if not W_EXACT:
                        kc = tl.minimum(end, K) - seg_lo
                        tot += kc * (bw[:, None] * a[None, :])
                acc += tot.to(tl.float32) * sw[:, None]
                seg = tl.zeros((BN, BM), tl.int32)
                sx_seg = tl.zeros((BM,), tl.int32)
                sw_seg = tl.zeros((BN,), tl.int32)
            else:
                acc += seg * sw[:, None]
                seg = tl.zeros((BN, BM), tl.float32)
            seg_lo = end

    # ---- epilogue: token scale, bias, store (or accumulate the split-K partial)
    if INT_PATH:
        sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
        acc = acc * sx[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)
        acc += bias[:, None]
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    y_mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
