"""Triton GEMV on the k-packed layout (kernels/kpacked.py): the decode path, M = 1..few rows, every width 1..8.

Imported lazily (importing it imports triton). One kernel function, no helpers, so it runs compiled on a GPU
and in Triton's CPU interpreter alike.

Work split: program (pid_n, row, pid_k) owns BN output columns of one activation row and a contiguous range
of word rows of qweight_t (split-K). Each iteration loads a [BW, BN] tile of words: threads run along N, so
a warp reads whole 128-byte lines. Codes are expanded in registers with compile-time masks (no code straddles
a word) and turned into floats without an int-to-float convert: the code's bit field ORed into the mantissa of
2^23 is the float 2^23 + code * 2^shift, one subtraction leaves code * 2^shift, and the activation is
pre-scaled by 2^-shift (see the loop). Per word the kernel keeps sum_j w_j x_j and
sum_j x_j; the zero point enters once per word as (sum w x - z * sum x) and the scale as one multiply
(grouped), or both once at the end (per-channel). Integer activations (A <= 8) enter as the exact integers
u - z_x = xq + a and the token scale multiplies the result.

Split-K without extra launches: partial sums go to a float32 workspace with atomics, and the last program
of a column block to finish (a per-block counter) reads the total back, zeroes it, adds the bias, writes y in
its dtype and resets the counter. So the workspace and counters are zero again
after every launch, and one launch is the whole linear: no memset before, no cast after.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N", "K", "SEG", "NW", "stride_xm", "stride_ym", "SPLIT", "BLOCKS_PER_SPLIT", "MAGIC"])
def kp_gemv_kernel(x_ptr, sx_ptr, ax_ptr, qw_ptr, sw_ptr, zw_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                   N, K, SEG, NW, stride_xm, stride_ym, SPLIT, BLOCKS_PER_SPLIT, MAGIC,
                   BITS: tl.constexpr, PER: tl.constexpr, WPG: tl.constexpr, GROUPED: tl.constexpr,
                   BLOCK_IN_SEG: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, HIGH_SHIFT: tl.constexpr,
                   INT_PATH: tl.constexpr, A_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                   BN: tl.constexpr, BW: tl.constexpr, N_ALIGNED: tl.constexpr, PREFETCH: tl.constexpr):
    """MAGIC is 0x4B000000 (the bits of 2^23), passed at run time so that it lives in one register and each
    code's LOP3 takes its mask as the immediate: as a compile-time constant, ptxas made the magic the immediate
    and rematerialized the 16 different masks (one MOV per code in the sm_90 SASS).
    WPG is a compile-time constant for groups (0 per channel: one segment, word row w holds columns
    w * PER ...). EVEN_K: every word slot is a real column (SEG % PER == 0, K % SEG == 0, NW % BW == 0), so no
    column masks. BLOCK_IN_SEG: each BW-row block lies inside one group (WPG % BW == 0)."""
    if N_ALIGNED:  # passed divided by 16 so that Triton sees the divisibility and vectorizes along N
        N = N * 16
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    rw = tl.arange(0, BW)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    if A_OFFSET:
        a = tl.load(ax_ptr + row).to(tl.float32)
    else:
        a = 0.0
    # The tile layout puts all BW rows of a column in one thread when BN >= 128 * num_warps (the launcher's
    # defaults do): then the sums over rows below are register adds, with no shuffles or shared memory.
    acc = tl.zeros((BN,), tl.float32)
    xacc = tl.zeros((BW, 1), tl.float32)  # per-channel: sum of x over the split
    b_lo = pid_k * BLOCKS_PER_SPLIT
    b_hi = tl.minimum(b_lo + BLOCKS_PER_SPLIT, tl.cdiv(NW, BW))
    # PREFETCH: the next tile's words are loaded before this tile is computed (two tiles in flight per thread;
    # Triton does not pipeline loads that feed no dot). The last iteration re-reads its own tile (a cache hit)
    # instead of masking.
    nxt = tl.zeros((BW, BN), tl.int32)
    if PREFETCH:
        w_next = b_lo * BW + rw
        if EVEN_N and EVEN_K:
            nxt = tl.load(qw_ptr + w_next[:, None].to(tl.int64) * N + rn[None, :])
        else:
            nxt = tl.load(qw_ptr + w_next[:, None].to(tl.int64) * N + rn[None, :],
                          mask=(w_next < NW)[:, None] & n_ok[None, :], other=0)
    for blk in range(b_lo, b_hi):
        w = blk * BW + rw  # word rows of this tile
        w_ok = w < NW
        if PREFETCH:
            words = nxt.to(tl.uint32, bitcast=True)
            w_next = tl.minimum(blk + 1, b_hi - 1) * BW + rw
            if EVEN_N and EVEN_K:
                nxt = tl.load(qw_ptr + w_next[:, None].to(tl.int64) * N + rn[None, :])
            else:
                nxt = tl.load(qw_ptr + w_next[:, None].to(tl.int64) * N + rn[None, :],
                              mask=(w_next < NW)[:, None] & n_ok[None, :], other=0)
        else:
            if EVEN_N and EVEN_K:
                words = tl.load(qw_ptr + w[:, None].to(tl.int64) * N + rn[None, :])
            else:
                words = tl.load(qw_ptr + w[:, None].to(tl.int64) * N + rn[None, :], mask=w_ok[:, None] & n_ok[None, :],
                                other=0)
            words = words.to(tl.uint32, bitcast=True)
        if GROUPED:
            g = w // WPG
            slot0 = (w - g * WPG) * PER  # position of the word's first code inside its segment
            kbase = g * SEG + slot0
        else:
            g = w * 0
            slot0 = w * PER
            kbase = slot0
        wx = tl.zeros((BW, BN), tl.float32)
        xs = tl.zeros((BW, 1), tl.float32)
        high = words >> HIGH_SHIFT  # codes above mantissa bit 23 are read from here
        for j in tl.static_range(PER):
            if EVEN_K:
                xj = tl.load(x_row + kbase + j).to(tl.float32)
                if A_OFFSET:
                    xj = xj + a
            else:
                k_ok = w_ok & (slot0 + j < SEG) & (kbase + j < K)
                xj = tl.load(x_row + kbase + j, mask=k_ok, other=0).to(tl.float32)
                if A_OFFSET:
                    xj = tl.where(k_ok, xj + a, 0.0)
            xs += xj[:, None]
            # The code is masked in place, not shifted down: with its field at bits [sh, sh + BITS) below bit 23,
            # OR-ing in the exponent of 2^23 gives the float 2^23 + code * 2^sh exactly; minus 2^23 it is
            # code * 2^sh, and x * 2^-sh (exact: a power of two) undoes the scale. One LOP3 and one FADD per
            # code instead of shift + mask + OR + FADD; the shift happens once per word (`high`).
            if j * BITS + BITS <= 23:
                sh = j * BITS
                field = words & (((1 << BITS) - 1) << sh)
            else:
                sh = j * BITS - HIGH_SHIFT
                field = high & (((1 << BITS) - 1) << sh)
            code_f = (field | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
            wx += code_f * (xj * (1.0 / (1 << sh)))[:, None]
        if GROUPED:
            if BLOCK_IN_SEG:  # one group for the whole tile: reduce the rows first, then one zero/scale per column
                gb = (blk * BW) // WPG
                z = tl.load(zw_ptr + gb * N + rn, mask=n_ok, other=0).to(tl.float32)
                s = tl.load(sw_ptr + gb * N + rn, mask=n_ok, other=0.0).to(tl.float32)
                acc += (tl.sum(wx, axis=0) - z * tl.sum(xs)) * s
            else:
                meta = g[:, None] * N + rn[None, :]
                m_ok = w_ok[:, None] & n_ok[None, :]
                z = tl.load(zw_ptr + meta, mask=m_ok, other=0).to(tl.float32)
                s = tl.load(sw_ptr + meta, mask=m_ok, other=0.0).to(tl.float32)
                acc += tl.sum((wx - z * xs) * s, axis=0)
        else:
            acc += tl.sum(wx, axis=0)
            xacc += xs
    out = acc
    if not GROUPED:
        z = tl.load(zw_ptr + rn, mask=n_ok, other=0).to(tl.float32)
        s = tl.load(sw_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        out = (out - z * tl.sum(xacc)) * s
    if INT_PATH:
        out = out * tl.load(sx_ptr + row)
    y_ptrs = y_ptr + row.to(tl.int64) * stride_ym + rn
    if not ATOMIC:
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        ws = ws_ptr + row.to(tl.int64) * N + rn
        tl.atomic_add(ws, out, mask=n_ok)  # acq_rel, gpu scope (Triton's defaults)
        tl.debug_barrier()  # every thread's partial is in before the block's one counter increment
        cnt = cnt_ptr + row * tl.num_programs(0) + pid_n
        done = tl.atomic_add(cnt, 1)
        if done == SPLIT - 1:  # the last partial of this column block: finish it and clean up
            # Every other partial is in (the counter says so): read the total at L2 with an atomic (a plain load
            # could hit a stale L1 line), then zero the workspace and the counter with plain stores (the next
            # launch starts after this one ends).
            tot = tl.atomic_add(ws, tl.zeros((BN,), tl.float32), mask=n_ok)
            tl.store(ws, tl.zeros((BN,), tl.float32), mask=n_ok)
            if HAS_BIAS:
                tot += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=n_ok)
            tl.store(cnt, 0)


# Prefill (M > 1) on the same layout: tensor cores on integer-valued operands. A [BKW, BN] tile of words is
# expanded to [BKW, PER_P, BN] codes with constant shifts (PER_P = PER rounded up to a power of two; slots
# >= PER and padding slots meet x = 0) and reshaped to the dot's [BK, BN] operand, row w * PER_P + j = code j of
# word w. Both operands are integers exact in the dot's dtype: (code - z_w) in [-255, 255], and x itself (A16)
# or u - z_x = xq + a (A <= 8, in fp16), so each group's dot is the exact integer sum up to fp32 accumulation
# rounding, and the scale is applied once per group (per channel: once at the end).
@triton.jit(do_not_specialize=["M", "N", "K", "SEG", "NW", "stride_xm", "stride_ym", "SPLIT", "STEPS_PER_SPLIT"])
def kp_gemm_kernel(x_ptr, sx_ptr, ax_ptr, qw_ptr, sw_ptr, zw_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                   M, N, K, SEG, NW, stride_xm, stride_ym, SPLIT, STEPS_PER_SPLIT,
                   BITS: tl.constexpr, PER: tl.constexpr, PER_P: tl.constexpr, WPG: tl.constexpr,
                   GROUPED: tl.constexpr, INT_PATH: tl.constexpr, A_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, GROUP_M: tl.constexpr,
                   DOT_F32: tl.constexpr, ATOMIC: tl.constexpr):
    """GROUPED: BKW divides WPG, so every K tile lies in one group. Per channel (WPG = 0) tiles run freely.
    Split-K (ATOMIC; decode batches, where M x N tiles alone leave most SMs idle): program (tile, pid_k) takes
    STEPS_PER_SPLIT K steps of BKW words and meets the others in the float32 workspace as kp_gemv_kernel does
    (the last one of a tile adds the bias, writes y and leaves workspace and counter zero)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % size_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    BK: tl.constexpr = BKW * PER_P
    rk = tl.arange(0, BK)
    r_w = rk // PER_P  # word (within the tile) of each dot row
    r_j = rk % PER_P  # slot within the word
    rw = tl.arange(0, BKW)
    shifts = (tl.arange(0, PER_P) * BITS).to(tl.uint32)
    if A_OFFSET:
        a = tl.load(ax_ptr + rm, mask=m_ok, other=0).to(tl.float32)
    acc = tl.zeros((BM, BN), tl.float32)
    if not GROUPED:
        z = tl.load(zw_ptr + rn, mask=n_ok, other=0).to(tl.float32)
    w_lo = pid_k * STEPS_PER_SPLIT * BKW
    w_hi = tl.minimum(w_lo + STEPS_PER_SPLIT * BKW, NW)
    for w0 in range(w_lo, w_hi, BKW):
        w = w0 + rw
        words = tl.load(qw_ptr + w[:, None].to(tl.int64) * N + rn[None, :], mask=(w < NW)[:, None] & n_ok[None, :],
                        other=0).to(tl.uint32, bitcast=True)
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BKW, PER_P, BN]
        if GROUPED:
            g = w0 // WPG
            z = tl.load(zw_ptr + g * N + rn, mask=n_ok, other=0).to(tl.float32)
        wv = tl.reshape(codes.to(tl.float32) - z[None, None, :], (BK, BN))
        # x columns of the dot rows: word w0 + r_w, slot r_j
        wr = w0 + r_w
        if GROUPED:
            seg_g = wr // WPG
            slot = (wr - seg_g * WPG) * PER + r_j
            kidx = seg_g * SEG + slot
        else:
            slot = wr * PER + r_j
            kidx = slot
        k_ok = (r_j < PER) & (wr < NW) & (slot < SEG) & (kidx < K)
        xv = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kidx[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0)
        if INT_PATH:
            xf = xv.to(tl.float32)
            if A_OFFSET:
                xf = tl.where(k_ok[None, :], xf + a[:, None], 0.0)
            xd = xf.to(tl.float16)
            wd = wv.to(tl.float16)
        else:
            xd = xv
            wd = wv.to(x_ptr.dtype.element_ty)
        if DOT_F32:
            part = tl.dot(xd.to(tl.float32), wd.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(xd, wd)
        if GROUPED:
            s = tl.load(sw_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc += part * s[None, :]
        else:
            acc += part
    if not GROUPED:
        acc = acc * tl.load(sw_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if INT_PATH:
        acc = acc * tl.load(sx_ptr + rm, mask=m_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    mn_ok = m_ok[:, None] & n_ok[None, :]
    if not ATOMIC:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mn_ok)
    else:
        ws = ws_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.atomic_add(ws, acc, mask=mn_ok)
        tl.debug_barrier()  # every thread's partial is in before the tile's one counter increment
        cnt = cnt_ptr + pid
        done = tl.atomic_add(cnt, 1)
        if done == SPLIT - 1:  # the last partial of this tile (see kp_gemv_kernel's epilogue)
            tot = tl.atomic_add(ws, tl.zeros((BM, BN), tl.float32), mask=mn_ok)
            tl.store(ws, tl.zeros((BM, BN), tl.float32), mask=mn_ok)
            if HAS_BIAS:
                tot += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=mn_ok)
            tl.store(cnt, 0)
