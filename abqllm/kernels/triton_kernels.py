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
segment. Segments: each group (outer loop over groups, static inner loop over its BK tiles, so the integer
segment accumulator lives only inside one group), or the whole split for per-channel scales (then there is
no float accumulator at all; the launcher caps the split length so the int32 sums cannot overflow).
The same kernel serves decode (BM = 16 with tl.dot, or BM = 1 on CUDA cores via _tile_gemv, split-K with
fp32 atomics) and prefill (large BM/BN tiles, grouped program order for L2 reuse, SPLIT_K = 1).
Register pressure was checked without a GPU by compiling for sm_90 (aot_compile) and reading ptxas -v.
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
        fv = tl.floor(v)  # (names differ from the scalars above: Triton types loop variables strictly)
        dv = v - fv
        odd_v = (fv - 2.0 * tl.floor(fv * 0.5)) != 0.0
        u = tl.minimum(tl.maximum(fv + tl.where((dv > 0.5) | ((dv == 0.5) & odd_v), 1.0, 0.0) + z, 0.0), QMAX * 1.0)
        tl.store(q_row + k0 + cols, (u - c).to(tl.int32).to(tl.int8), mask=kmask)
    tl.store(sx_ptr + row, s)
    tl.store(ax_ptr + row, (c - z).to(tl.int32))


@triton.jit
def _tile_dot(x_ptr, stride_xm, rm, m_ok, w_row, n_ok, k0, K, KW, zw,
              BITS: tl.constexpr, INT_PATH: tl.constexpr, W_EXACT: tl.constexpr, A_OFFSET: tl.constexpr,
              DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WORDS_P: tl.constexpr):
    """One [BN, BK] weight tile times the [BM, BK] activation tile on the tensor cores -> (part [BN, BM],
    sum of x' [BM], sum of w' [BN]) for the columns k0 .. k0 + BK (padding and columns >= K contribute 0)."""
    rk = k0 + tl.arange(0, BK)
    k_ok = rk < K
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
    # The tile's BK*BITS/32 words of each row are contiguous (k0 is a multiple of 32): one vector load,
    # then expanded in registers.
    wcol = (k0 // 32) * BITS + tl.arange(0, WORDS_P)
    w_mask = n_ok[:, None] & ((wcol < KW) & (tl.arange(0, WORDS_P) < BK // 32 * BITS))[None, :]
    words = tl.load(w_row + wcol[None, :], mask=w_mask, other=0).to(tl.uint32, bitcast=True)
    # Each code gathers the word holding its first bit (and, for odd widths, the next word: a code may
    # straddle two). Gathering beat broadcast-shift + reshape for power-of-two widths too in ptxas's
    # register/spill report (the reshape spreads a word's codes across lanes).
    rel = tl.arange(0, BK) * BITS
    idx = tl.broadcast_to((rel >> 5)[None, :], (BN, BK))
    sh = (rel & 31).to(tl.uint32)[None, :]
    code = tl.gather(words, idx, axis=1) >> sh
    if (32 % BITS) != 0:
        w1 = tl.gather(words, tl.minimum(idx + 1, WORDS_P - 1), axis=1)
        code = code | tl.where((sh + BITS) > 32, w1 << (32 - sh), 0)
    code = (code & ((1 << BITS) - 1)).to(tl.int32)
    if INT_PATH:
        if W_EXACT:
            wv = code - zw[:, None]
        else:
            wv = code - (1 << (BITS - 1))
        part = tl.dot(wv.to(tl.int8), tl.trans(x), out_dtype=tl.int32)
        if A_OFFSET:
            pw = tl.sum(tl.where(k_ok[None, :], wv, 0), axis=1)  # padded columns must not enter sum(w')
        else:
            pw = tl.zeros((BN,), tl.int32)
        if W_EXACT:
            px = tl.zeros((BM,), tl.int32)
        else:
            px = tl.sum(x.to(tl.int32), axis=1)
    else:
        wv = code - zw[:, None]  # integer-valued, exact in fp16/bf16
        if DOT_F32:
            part = tl.dot(wv.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(wv.to(x.dtype), tl.trans(x))
        px = tl.zeros((BM,), tl.int32)
        pw = tl.zeros((BN,), tl.int32)
    return part, px, pw


@triton.jit
def _tile_gemv(x_row, w_row, n_ok, k0, K, KW, zw,
               BITS: tl.constexpr, INT_PATH: tl.constexpr, W_EXACT: tl.constexpr, A_OFFSET: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr):
    """M = 1 on CUDA cores, one 32-code run at a time: a run is exactly BITS words and code j of it starts at
    bit j*BITS, so with the BITS words of every run in registers ([BN, runs] each) all shifts are constants.
    Everything stays in one [BN, runs] layout (no reshape, no gather). Returns like _tile_dot, BM = 1."""
    R: tl.constexpr = BK // 32
    run = k0 // 32 + tl.arange(0, R)
    w_runs = w_row + (run * BITS)[None, :]
    w_ok = n_ok[:, None] & (run * BITS < KW)[None, :]
    x_run = x_row + run * 32
    if INT_PATH:
        acc = tl.zeros((BN, R), tl.int32)
        if W_EXACT:
            center = zw[:, None]
        else:
            center = tl.full((BN, 1), 1 << (BITS - 1), tl.int32)
    else:
        acc = tl.zeros((BN, R), tl.float32)
        center = zw[:, None]
    wsum = tl.zeros((BN, R), tl.int32)
    xsum = tl.zeros((1, R), tl.int32)
    cur = tl.load(w_runs, mask=w_ok, other=0).to(tl.uint32, bitcast=True)
    nxt = cur  # (defined for BITS = 1 too: the compiler resolves names even in statically dead branches)
    for i in tl.static_range(BITS):
        if i + 1 < BITS:
            nxt = tl.load(w_runs + (i + 1), mask=w_ok, other=0).to(tl.uint32, bitcast=True)
        for j in tl.static_range((32 * i + BITS - 1) // BITS, (32 * (i + 1) + BITS - 1) // BITS):
            sh = j * BITS - 32 * i  # first bit of code j inside word i (a compile-time constant)
            c = cur >> sh
            if sh + BITS > 32:
                c = c | (nxt << (32 - sh))
            wv = (c & ((1 << BITS) - 1)).to(tl.int32) - center
            col_ok = (run * 32 + j < K)[None, :]
            xj = tl.load(x_run + j, mask=run * 32 + j < K, other=0)[None, :]
            if INT_PATH:
                acc += wv * xj.to(tl.int32)
                if A_OFFSET:
                    wsum += tl.where(col_ok, wv, 0)
                if not W_EXACT:
                    xsum += xj.to(tl.int32)
            else:
                acc += wv.to(tl.float32) * xj.to(tl.float32)
        if i + 1 < BITS:
            cur = nxt
    part = tl.sum(acc, axis=1)[:, None]
    return part, tl.sum(xsum, axis=1), tl.sum(wsum, axis=1)


@triton.jit
def _corrected(part, px, pw, zw, a, kc, BITS: tl.constexpr, W_EXACT: tl.constexpr, A_OFFSET: tl.constexpr):
    """Integer segment -> sum over it of (x - z_x)(w - z_w) as float32 (ABQ.md section 5)."""
    tot = part
    if not W_EXACT:
        bw = (1 << (BITS - 1)) - zw
        tot += bw[:, None] * px[None, :]
    if A_OFFSET:
        tot += pw[:, None] * a[None, :]
        if not W_EXACT:
            tot += kc * (bw[:, None] * a[None, :])
    return tot.to(tl.float32)


# Sizes are not specialized (one compile serves every shape). Instead, when K % 16 == 0, KW % 4 == 0 and
# stride_xm % 16 == 0 (rows start 16-byte aligned, masks constant over 16-byte vectors) the launcher passes
# ALIGNED and K / 16, KW / 4, stride_xm / 16; multiplying them back here lets Triton see the divisibility
# (tl.multiple_of has no effect on scalar arguments) and vectorize the loads.
@triton.jit(do_not_specialize=["M", "N", "K", "KW", "G", "stride_xm", "stride_ym", "K_PER_SPLIT"])
def qlinear_kernel(x_ptr, sx_ptr, ax_ptr, qw_ptr, sw_ptr, zw_ptr, bias_ptr, y_ptr,
                   M, N, K, KW, G, stride_xm, stride_ym, K_PER_SPLIT,
                   BITS: tl.constexpr, GS: tl.constexpr, INT_PATH: tl.constexpr, W_EXACT: tl.constexpr,
                   A_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, USE_DOT: tl.constexpr,
                   DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr, WORDS_P: tl.constexpr, ALIGNED: tl.constexpr):
    if ALIGNED:
        K = K * 16
        KW = KW * 4
        stride_xm = stride_xm * 16
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
    w_row = qw_ptr + rn[:, None] * KW
    x_row = x_ptr + pid_m * stride_xm  # the token row when BM == 1 (CUDA-core path)
    if A_OFFSET:
        a = tl.load(ax_ptr + rm, mask=m_ok, other=0)
    else:
        a = tl.zeros((BM,), tl.int32)

    if GS == 0:
        # Per-channel: one segment per split (the launcher keeps it short enough for exact int32 sums).
        zw = tl.load(zw_ptr + rn, mask=n_ok, other=0).to(tl.int32)
        if INT_PATH:
            seg = tl.zeros((BN, BM), tl.int32)
        else:
            seg = tl.zeros((BN, BM), tl.float32)
        px = tl.zeros((BM,), tl.int32)
        pw = tl.zeros((BN,), tl.int32)
        for k0 in range(k_lo, k_hi, BK):
            if USE_DOT:
                p, x_s, w_s = _tile_dot(x_ptr, stride_xm, rm, m_ok, w_row, n_ok, k0, K, KW, zw, BITS, INT_PATH,
                                        W_EXACT, A_OFFSET, DOT_F32, BM, BN, BK, WORDS_P)
            else:
                p, x_s, w_s = _tile_gemv(x_row, w_row, n_ok, k0, K, KW, zw, BITS, INT_PATH, W_EXACT, A_OFFSET, BN, BK)
            seg += p
            px += x_s
            pw += w_s
        sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if INT_PATH:
            acc = _corrected(seg, px, pw, zw, a, k_hi - k_lo, BITS, W_EXACT, A_OFFSET) * sw[:, None]
        else:
            acc = seg * sw[:, None]
    else:
        # Groups: the launcher makes BK divide GS and splits start on group boundaries.
        acc = tl.zeros((BN, BM), tl.float32)
        for g0 in range(k_lo, k_hi, GS):
            g = g0 // GS
            zw = tl.load(zw_ptr + rn * G + g, mask=n_ok, other=0).to(tl.int32)
            if INT_PATH:
                seg = tl.zeros((BN, BM), tl.int32)
            else:
                seg = tl.zeros((BN, BM), tl.float32)
            px = tl.zeros((BM,), tl.int32)
            pw = tl.zeros((BN,), tl.int32)
            for t in tl.static_range(GS // BK):
                if USE_DOT:
                    p, x_s, w_s = _tile_dot(x_ptr, stride_xm, rm, m_ok, w_row, n_ok, g0 + t * BK, K, KW, zw, BITS,
                                            INT_PATH, W_EXACT, A_OFFSET, DOT_F32, BM, BN, BK, WORDS_P)
                else:
                    p, x_s, w_s = _tile_gemv(x_row, w_row, n_ok, g0 + t * BK, K, KW, zw, BITS, INT_PATH, W_EXACT,
                                             A_OFFSET, BN, BK)
                seg += p
                px += x_s
                pw += w_s
            sw = tl.load(sw_ptr + rn * G + g, mask=n_ok, other=0.0).to(tl.float32)
            if INT_PATH:
                acc += _corrected(seg, px, pw, zw, a, tl.minimum(g0 + GS, K) - g0, BITS, W_EXACT, A_OFFSET) * sw[:, None]
            else:
                acc += seg * sw[:, None]

    # ---- epilogue: token scale, bias, store (or accumulate the split-K partial)
    if INT_PATH:
        sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
        acc = acc * sx[None, :]
    if HAS_BIAS:
        # Only the first split-K partial adds the bias. The mask is built as a boolean tensor: triton 3.9's
        # interpreter refuses the integer array that `n_ok & (pid_k == 0)` (tensor & scalar) gives it.
        first_split = tl.full(rn.shape, pid_k, tl.int32) == 0
        bias = tl.load(bias_ptr + rn, mask=n_ok & first_split, other=0.0).to(tl.float32)
        acc += bias[:, None]
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    y_mask = n_ok[:, None] & m_ok[None, :]
    if ATOMIC:  # split-K: partial sums meet in a zeroed float32 buffer
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# GEMV for power-of-two storage widths (1, 2, 4, 8 bits), one activation row per program: the decode path.
# Each program streams BN rows, NG groups of CW words per iteration; a thread takes VW words of a row and group
# at a time (one 16-byte load along K), expands each word into its 32/BITS codes with constant shifts and
# accumulates code * x in fp32 in the codes' own [BN, NG, VW, PER] shape, so the sums stay in registers until
# the group ends; then sum w x - z_w sum x is scaled per group (zeros and scales are touched once per group).
# Integer activations enter as the exact integers u - z_x = xq + a: w (u - z_x) <= 255^2 and a group of <= 256
# columns sums exactly in fp32 (< 2^24), so the result equals the integer formula up to the float32 rounding
# of the scale products. Why it is built this way: docs/kernels.md (sm_90 SASS, first H100 run).
@triton.jit(do_not_specialize=["N", "K", "KW", "G", "stride_xm", "stride_ym", "CHUNKS_PER_SPLIT"])
def gemv_kernel(x_ptr, sx_ptr, ax_ptr, qw_ptr, sw_ptr, zw_ptr, bias_ptr, y_ptr,
                N, K, KW, G, stride_xm, stride_ym, CHUNKS_PER_SPLIT,
                BITS: tl.constexpr, GS: tl.constexpr, INT_PATH: tl.constexpr, A_OFFSET: tl.constexpr,
                HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
                CW: tl.constexpr, PER: tl.constexpr, VW: tl.constexpr, ALIGNED: tl.constexpr):
    if ALIGNED:  # as in qlinear_kernel: passed divided so that Triton sees the divisibility and vectorizes
        K = K * 16
        KW = KW * 4
        stride_xm = stride_xm * 16
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    rn4 = rn[:, None, None, None]
    n_ok4 = n_ok[:, None, None, None]
    g4 = tl.arange(0, NG)[None, :, None, None]
    w4 = tl.arange(0, VW)[None, None, :, None]
    j4 = tl.arange(0, PER)[None, None, None, :]
    shifts = (j4 * BITS).to(tl.uint32)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    w_rows = qw_ptr + rn4.to(tl.int64) * KW
    if A_OFFSET:
        a = tl.load(ax_ptr + row).to(tl.float32)
    else:
        a = 0.0
    # The zero point enters through the group's sum of x: sum (w - z_w) x = sum w x - z_w sum x, so zeros and
    # scales are only touched on the reduced [BN, NG] tensor, never per code.
    acc = tl.zeros((BN, NG, 1, 1), tl.float32)
    acc_x = tl.zeros((1, NG, 1, 1), tl.float32)  # per-channel only: sum of x over the split
    c_lo = pid_k * CHUNKS_PER_SPLIT
    c_hi = tl.minimum(c_lo + CHUNKS_PER_SPLIT, tl.cdiv(KW, NG * CW))
    for ci in range(c_lo, c_hi):
        # The group's CW words in steps of VW (one 16-byte vector per row and group): every step's codes and
        # x stay inside one thread, so the sums below reduce in registers (no shuffles, no barriers).
        # Per-thread partial sums in the codes' own shape: one FFMA per code; reduced once per group.
        wx4 = tl.zeros((BN, NG, VW, PER), tl.float32)
        xs4 = tl.zeros((1, NG, VW, PER), tl.float32)
        for v in tl.static_range(CW // VW):
            widx = ci * (NG * CW) + g4 * CW + v * VW + w4  # [1, NG, VW, 1] word index within the row
            words = tl.load(w_rows + widx, mask=n_ok4 & (widx < KW), other=0)  # [BN, NG, VW, 1]
            # code -> float without an int-to-float convert (a quarter-rate instruction): the code in the
            # mantissa of 2^23 is exactly 2^23 + code, and one full-rate subtraction leaves the code.
            bits = ((words.to(tl.uint32, bitcast=True) >> shifts) & ((1 << BITS) - 1)) | 0x4B000000
            codes = bits.to(tl.float32, bitcast=True) - 8388608.0
            kidx = widx * PER + j4  # [1, NG, VW, PER] column of each code
            xv = tl.load(x_row + kidx, mask=kidx < K, other=0).to(tl.float32)
            if INT_PATH:
                xv = tl.where(kidx < K, xv + a, 0.0)  # u - z_x; columns past K stay 0
            wx4 += codes * xv
            xs4 += xv
        wx = tl.sum(tl.sum(wx4, axis=3, keep_dims=True), axis=2, keep_dims=True)  # [BN, NG, 1, 1]
        xs = tl.sum(tl.sum(xs4, axis=3, keep_dims=True), axis=2, keep_dims=True)  # [1, NG, 1, 1]
        if GS == 0:
            acc += wx
            acc_x += xs
        else:
            gidx = ci * NG + g4  # [1, NG, 1, 1]
            meta = rn4 * G + gidx
            m_ok = n_ok4 & (gidx < G)
            zw = tl.load(zw_ptr + meta, mask=m_ok, other=0).to(tl.float32)
            sw = tl.load(sw_ptr + meta, mask=m_ok, other=0.0).to(tl.float32)
            acc += (wx - zw * xs) * sw
    if GS == 0:
        zw_c = tl.load(zw_ptr + rn4, mask=n_ok4, other=0).to(tl.float32)
        acc = acc - zw_c * acc_x
    out = tl.sum(tl.reshape(acc, (BN, NG)), axis=1)
    if GS == 0:
        out = out * tl.load(sw_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if INT_PATH:
        out = out * tl.load(sx_ptr + row)
    if HAS_BIAS:
        first_split = tl.full(rn.shape, pid_k, tl.int32) == 0
        out += tl.load(bias_ptr + rn, mask=n_ok & first_split, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + row.to(tl.int64) * stride_ym + rn
    if ATOMIC:
        tl.atomic_add(y_ptrs, out, mask=n_ok)
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=n_ok)
