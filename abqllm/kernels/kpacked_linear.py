"""The decode GEMV on the k-packed layout: launcher, tile heuristics and the per-layer layout cache.

`kp_gemv` computes y = Q_a(x) @ W^T + bias for a few rows x [M, K] (every storage width 1..8, A16 in
fp16/bf16/fp32 or A2..A8, per-channel or any group size) with triton_kpacked.kp_gemv_kernel. The 'triton'
linear kernel takes it on CUDA for M <= KP_MAX_M (each row streams the weights once more, so it pays only for
decode); linear kernel 'triton-kpacked' serves every M on this layout, with `kp_gemm` (tensor cores) above
KP_MAX_M rows. Device: CUDA, or the CPU inside
Triton's interpreter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from abqllm.kernels import kpacked as KP
from abqllm.kernels.registry import register

# Rows up to which the 'triton' kernel takes the GEMV on CUDA: at M = 2 it already lost to qlinear_kernel's dot
# path on the H200 (benchmarks/results/gpu_h200_2026-11-28_kp: W4A16 4096^2, 36.0 vs 20.8 us).
KP_MAX_M = 1
MAGIC_BITS = 0x4B000000  # the float 2^23: kp_gemv_kernel's code-to-float constant (a run-time argument; see there)


@dataclass(frozen=True)
class KpConfig:
    """bn output columns x bw word rows per tile; split_k 0 = automatic: enough programs for `warps_per_sm`
    resident warps per SM (the GEMV is latency-bound: what matters is loads in flight)."""
    bn: int = 1024
    bw: int = 4
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 1
    # 16 = 4 four-warp programs per SM: the split the best H200 timings ran with (4 programs per SM, 1024 x 4
    # tiles). At 80-128 registers a thread (benchmarks/results/kp_sass.json) 4-6 such programs fit on an SM, so 16
    # is one wave; 32 (untimed) would need a second wave for most widths.
    warps_per_sm: int = 16
    prefetch: bool = False  # load the next tile before computing this one (untimed; see kp_gemv_kernel)


def default_kp_config(bits: int, group_size: int, k: int, n: int = 8192) -> KpConfig:
    """From the first H200 run (benchmarks/results/gpu_h200_2026-11-28_kp, tile sweep at 8192^2): 4-warp programs
    of 1024 columns x 4 word rows beat every 1-warp tile (W4A16 25.6 us against 35-67 us; W2A16 21.6 against
    23.6-42). Each thread owns 8 columns and all BW rows of them (row sums in registers). BW divides the words of
    a group (one zero/scale per tile): the per-row zero/scale path cost 16 shuffles and barriers per iteration
    in the sm_90 SASS of multi-warp tiles."""
    wpg = KP.words_per_segment(k, group_size, bits)
    bw = 4 if not group_size else next(b for b in (4, 2, 1) if wpg % b == 0)
    bn = max(256, min(1024, 1 << max(0, (n - 1).bit_length())))
    return KpConfig(bn=bn, bw=bw, num_warps=bn // 256)


def high_shift(bits: int) -> int:
    """Codes whose bit field ends above bit 23 (the float mantissa) are read from word >> HIGH_SHIFT: the start of
    the first such code. After that shift every such field ends at bit 16 or lower (checked in the tests)."""
    per = KP.codes_per_word(bits)
    firsts = [j * bits for j in range(per) if j * bits + bits > 23]
    return firsts[0] if firsts else 0


def kp_plan(m: int, n: int, nw: int, cfg: KpConfig, sms: int) -> tuple[int, int, int]:
    """(grid_n, split, blocks_per_split): splits are runs of whole BW-word blocks, none empty."""
    grid_n = -(-n // cfg.bn)
    blocks = -(-nw // cfg.bw)
    split = cfg.split_k or max(1, cfg.warps_per_sm * sms // max(1, grid_n * m * cfg.num_warps))
    per = -(-blocks // max(1, min(split, blocks)))
    return grid_n, -(-blocks // per), per


_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 partial sums and int32 counters for split-K. The kernel leaves both zero again, so they
    are allocated once per device (and grown) and shared by every launch on that device's stream."""
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < counters:
        floats = max(floats, 0 if ws is None else ws.numel())
        counters = max(counters, 0 if cnt is None else cnt.numel())
        ws = torch.zeros(floats, dtype=torch.float32, device=device)
        cnt = torch.zeros(counters, dtype=torch.int32, device=device)
        _WORKSPACE[device] = ws, cnt
    return ws, cnt


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _kernel():
    from abqllm.kernels import triton_kpacked  # imports triton
    return triton_kpacked.kp_gemv_kernel


def _prologue(x, qweight_t, scales_t, in_features, bits, group_size, act_bits, act_symmetric, act_scale, act_zero,
              out, who: str):
    """Checks shared by kp_gemv and kp_gemm, then x as [M, K] rows (quantized for A <= 8) and the output buffer.
    Returns (out_shape, m, y [M, N], a_in, sx, ax); m == 0 means there is nothing to launch."""
    from abqllm.kernels.triton_linear import act_quant

    if not 1 <= bits <= 8 or not (act_bits == 16 or 2 <= act_bits <= 8):
        raise ValueError(f"{who} supports storage bits 1..8 and A2..A8 or A16, got {bits} bits, A{act_bits}")
    k, n = in_features, qweight_t.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, layer expects {k}")
    need = -(-k // KP.segment_length(k, group_size)) * KP.words_per_segment(k, group_size, bits)
    if qweight_t.shape[0] != need:
        raise ValueError(f"qweight_t has {qweight_t.shape[0]} word rows; {k} features at {bits} bits, group "
                         f"{group_size} need {need}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is not None and (out.dtype != x.dtype or not out.is_contiguous() or out.numel() != m * n):
        raise ValueError("out must be a contiguous tensor of x's dtype with [..., N] elements")
    y = out.view(m, n) if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and act_bits != 16:
        a_in, sx, ax = act_quant(x2, act_bits, act_symmetric, act_scale, act_zero)
    else:
        a_in, sx, ax = x2, scales_t, scales_t  # unused on the float path
    return (*x.shape[:-1], n), m, y, a_in, sx, ax


def kp_gemv(x: torch.Tensor, qweight_t: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
            bias: torch.Tensor | None, act_scale: torch.Tensor | None, act_zero: torch.Tensor | None,
            in_features: int, bits: int, group_size: int, act_bits: int, act_symmetric: bool,
            config: KpConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] in x's dtype. The reference is kernels/reference.py (same arithmetic, float64)."""
    from abqllm.kernels.triton_linear import interpreting

    out_shape, m, y, a_in, sx, ax = _prologue(x, qweight_t, scales_t, in_features, bits, group_size, act_bits,
                                              act_symmetric, act_scale, act_zero, out, "kp_gemv")
    if m == 0:
        return y.reshape(out_shape)
    k, n, nw = in_features, qweight_t.shape[1], qweight_t.shape[0]
    cfg = config or default_kp_config(bits, group_size, k, n)
    sms = 4 if interpreting() else _num_sms(x.device.index or 0)
    grid_n, split, per = kp_plan(m, n, nw, cfg, sms)
    ws, cnt = workspace(x.device, m * n, m * grid_n) if split > 1 else (scales_t, scales_t)
    const = kp_constexprs(bits, group_size, k, n, act_bits, act_symmetric, bias is not None, split, cfg)
    _kernel()[(grid_n, m, split)](
        a_in, sx, ax, qweight_t, scales_t, zeros_t, bias if bias is not None else scales_t, y, ws, cnt,
        n // 16 if const["N_ALIGNED"] else n, k, KP.segment_length(k, group_size), nw, a_in.stride(0), y.stride(0),
        split, per, MAGIC_BITS, **const, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.reshape(out_shape)


@dataclass(frozen=True)
class KpGemmConfig:
    """kp_gemm_kernel tiles: bm x bn outputs, bkw words of K per step (bkw * PER_P dot rows)."""
    bm: int = 64
    bn: int = 128
    bkw: int = 0  # 0: automatic (about 64 dot rows, dividing the group's words)
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 0  # 0: automatic (kp_gemm_plan), 1: off


# Split-K for kp_gemm: aim at this many programs per SM when the M x N tiles alone are fewer than the SMs, and
# give each split at least MIN_STEPS K steps (the workspace round trip must stay small beside the streamed words).
GEMM_PROGRAMS_PER_SM = 2
GEMM_MIN_STEPS = 4


def kp_gemm_plan(m: int, n: int, nw: int, bkw: int, cfg: KpGemmConfig, sms: int) -> tuple[int, int, int]:
    """(tiles, split, steps_per_split) for kp_gemm_kernel: splits are runs of whole K steps, none empty. A decode
    batch (M = 16 at N = K = 8192: 64 tiles of 16 x 128 on 132 SMs) gets split-K; prefill tiles fill the GPU."""
    tiles = -(-m // cfg.bm) * -(-n // cfg.bn)
    steps = -(-nw // bkw)
    if cfg.split_k:
        split = cfg.split_k
    elif tiles >= sms:
        split = 1
    else:
        split = min(-(-GEMM_PROGRAMS_PER_SM * sms // tiles), max(1, steps // GEMM_MIN_STEPS))
    per = -(-steps // max(1, min(split, steps)))
    return tiles, -(-steps // per), per


def _per_p(bits: int) -> int:
    per = KP.codes_per_word(bits)
    return 1 << (per - 1).bit_length()


def gemm_bkw(bits: int, group_size: int, k: int, rows: int = 64) -> int:
    """Words per K step: about `rows` dot rows, a divisor of the group's words (a step never spans two groups)."""
    wpg = KP.words_per_segment(k, group_size, bits)
    bkw = max(1, rows // _per_p(bits))
    while group_size and wpg % bkw:
        bkw //= 2
    return max(1, bkw)


def default_kp_gemm_config(m: int, interpret: bool) -> KpGemmConfig:
    """Untimed (no GPU run has measured kp_gemm yet); the interpreter gets small tiles."""
    if interpret:
        return KpGemmConfig(bm=16, bn=32, num_warps=4, num_stages=1)
    if m <= 32:  # decode batches: the smallest M tile the tensor cores take, split-K for the rest of the GPU
        return KpGemmConfig(bm=16 if m <= 16 else 32, bn=128, num_warps=4)
    return KpGemmConfig(bm=64 if m <= 64 else 128, bn=128, num_warps=4 if m <= 64 else 8)


def kp_gemm_constexprs(bits: int, group_size: int, k: int, act_bits: int, act_symmetric: bool, has_bias: bool,
                       x_dtype: torch.dtype, cfg: KpGemmConfig, interpret: bool, split: int = 1) -> dict:
    """The compile-time parameters of kp_gemm_kernel (shared by kp_gemm and aot_compile_kp_gemm)."""
    from abqllm.kernels.triton_linear import act_center_exact
    int_path = act_bits != 16
    wpg = KP.words_per_segment(k, group_size, bits)
    bkw = cfg.bkw or gemm_bkw(bits, group_size, k)
    if group_size and wpg % bkw:
        raise ValueError(f"bkw {bkw} must divide the {wpg} words of a group")
    # fp32 x takes an exact fp32 dot; so does bf16 in the interpreter, whose tl.dot multiplies bf16 as raw bits
    dot_f32 = not int_path and (x_dtype not in (torch.float16, torch.bfloat16)
                                or (interpret and x_dtype == torch.bfloat16))
    return dict(BITS=bits, PER=KP.codes_per_word(bits), PER_P=_per_p(bits), WPG=wpg if group_size else 0,
                GROUPED=group_size > 0, INT_PATH=int_path,
                A_OFFSET=int_path and not act_center_exact(act_bits, act_symmetric), HAS_BIAS=has_bias, BM=cfg.bm,
                BN=cfg.bn, BKW=bkw, GROUP_M=cfg.group_m, DOT_F32=dot_f32, ATOMIC=split > 1)


def kp_gemm(x: torch.Tensor, qweight_t: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
            bias: torch.Tensor | None, act_scale: torch.Tensor | None, act_zero: torch.Tensor | None,
            in_features: int, bits: int, group_size: int, act_bits: int, act_symmetric: bool,
            config: KpGemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = Q_a(x) @ W^T + bias for any M on the k-packed layout (tensor cores; see kp_gemm_kernel)."""
    from abqllm.kernels import triton_kpacked
    from abqllm.kernels.triton_linear import interpreting

    out_shape, m, y, a_in, sx, ax = _prologue(x, qweight_t, scales_t, in_features, bits, group_size, act_bits,
                                              act_symmetric, act_scale, act_zero, out, "kp_gemm")
    if m == 0:
        return y.reshape(out_shape)
    k, n, nw = in_features, qweight_t.shape[1], qweight_t.shape[0]
    interp = interpreting()
    cfg = config or default_kp_gemm_config(m, interp)
    bkw = cfg.bkw or gemm_bkw(bits, group_size, k)
    sms = 4 if interp else _num_sms(x.device.index or 0)
    tiles, split, per = kp_gemm_plan(m, n, nw, bkw, cfg, sms)
    ws, cnt = workspace(x.device, m * n, tiles) if split > 1 else (scales_t, scales_t)
    const = kp_gemm_constexprs(bits, group_size, k, act_bits, act_symmetric, bias is not None, x.dtype, cfg, interp,
                               split)
    triton_kpacked.kp_gemm_kernel[(tiles, split)](
        a_in, sx, ax, qweight_t, scales_t, zeros_t, bias if bias is not None else scales_t, y, ws, cnt,
        m, n, k, KP.segment_length(k, group_size), nw, a_in.stride(0), y.stride(0), split, per,
        **const, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.reshape(out_shape)


def _version(layer) -> tuple:
    return tuple((id(t), t._version) for t in (layer.qweight, layer.scales, layer.zeros))


def layer_kpacked(layer) -> KP.KPacked:
    """The layer's weights in the k-packed layout, built on first use and cached on the layer until its packed
    buffers change (reassigned or written in place) or it moves. The cache holds a second copy of the weights
    beside the checkpoint's bitstream buffer (see keep_only_kpacked)."""
    cached = layer._kernel_cache.get("kpacked")
    if cached is None or cached[0] != _version(layer):
        w = layer.spec.weight
        cached = (_version(layer), KP.from_bitstream(layer.qweight, layer.scales, layer.zeros, layer.in_features,
                                                     w.storage_bits, w.group_size))
        layer._kernel_cache["kpacked"] = cached
    return cached[1]


def _offload_bitstream(mod) -> int:
    """Build the layer's k-packed layout on its GPU, then move its checkpoint bitstream `qweight` to CPU memory:
    the weights are held once on the GPU. Saving still works (the state dict reads the CPU copy); moving the layer
    again (`.to`) brings qweight along and drops the k-packed cache. Returns the GPU bytes released."""
    kp = layer_kpacked(mod)
    freed = mod.qweight.numel() * mod.qweight.element_size()
    mod.qweight = mod.qweight.cpu()
    mod._kernel_cache["kpacked"] = (_version(mod), kp)  # same codes, the buffer just moved
    return freed


def keep_only_kpacked(model: torch.nn.Module) -> int:
    """Hold each CUDA QuantLinear's weights once on the GPU, in the k-packed layout, and serve every M from it
    (kernel 'triton-kpacked'). Returns the GPU bytes released."""
    from abqllm.nn import QuantLinear
    freed = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.qweight.is_cuda:
            freed += _offload_bitstream(mod)
            mod.kernel = "triton-kpacked"
    return freed


def settle_layouts(model: torch.nn.Module) -> int:
    """Where this GPU's dispatch table serves every row count of a layer's scheme from the k-packed layout, hold
    that layer's weights once (as keep_only_kpacked, the kernel choice staying `auto`). Without a table, or where
    the table still takes a kernel that reads the checkpoint bitstream, nothing changes. Returns bytes released.
    `load_quantized(..., device='cuda')` calls it; call it after moving a model to a GPU yourself."""
    from abqllm.kernels import dispatch_table
    from abqllm.nn import QuantLinear
    freed = 0
    for mod in model.modules():
        if (isinstance(mod, QuantLinear) and mod.qweight.is_cuda and mod.kernel == "auto"
                and not dispatch_table.bitstream_needed(mod, mod.qweight.device)):
            freed += _offload_bitstream(mod)
    return freed


def layer_kp_args(layer) -> dict:
    kp, spec = layer_kpacked(layer), layer.spec
    return dict(qweight_t=kp.qweight_t, scales_t=kp.scales_t, zeros_t=kp.zeros_t, bias=layer.bias,
                act_scale=getattr(layer, "act_scale", None), act_zero=getattr(layer, "act_zero", None),
                in_features=layer.in_features, bits=spec.weight.storage_bits, group_size=spec.weight.group_size,
                act_bits=spec.act.bits, act_symmetric=spec.act.symmetric)


def rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def use_gemv(x: torch.Tensor) -> bool:
    """Whether the 'triton' kernel takes the GEMV for this input (CUDA decode: up to KP_MAX_M rows)."""
    return x.device.type == "cuda" and 0 < rows(x) <= KP_MAX_M


def _supports(layer, device: torch.device) -> bool:
    from abqllm.kernels.triton_linear import supports
    return supports(layer, device)


@register("linear", "triton-kpacked", priority=8, supports=_supports, layout="kpacked")
def linear_triton_kpacked(layer, x: torch.Tensor) -> torch.Tensor:
    """Every M on the k-packed layout: the GEMV up to KP_MAX_M rows, kp_gemm above; once DENSE_MIN_M is set, the
    dense path (dense_prefill.py) from that many rows on CUDA. The 'triton' kernel takes the GEMV (and the dense path)
    by itself on CUDA and keeps qlinear_kernel on the bitstream otherwise."""
    from abqllm.kernels import custom_ops, dense_prefill
    if 0 < rows(x) <= KP_MAX_M:
        return custom_ops.kp_gemv(x, **layer_kp_args(layer))
    if dense_prefill.use_dense(x):
        return custom_ops.dense_qlinear(x, **layer_kp_args(layer))
    return custom_ops.kp_gemm(x, **layer_kp_args(layer))


def kp_constexprs(bits: int, group_size: int, k: int, n: int, act_bits: int, act_symmetric: bool, has_bias: bool,
                  split: int, cfg: KpConfig) -> dict:
    """The compile-time parameters of kp_gemv_kernel for one launch (shared by kp_gemv and aot_compile_kp)."""
    from abqllm.kernels.triton_linear import act_center_exact
    int_path = act_bits != 16
    per, seg = KP.codes_per_word(bits), KP.segment_length(k, group_size)
    wpg = KP.words_per_segment(k, group_size, bits)
    nw = -(-k // seg) * wpg
    return dict(BITS=bits, PER=per, WPG=wpg if group_size else 0, GROUPED=group_size > 0,
                BLOCK_IN_SEG=group_size > 0 and wpg % cfg.bw == 0,
                EVEN_K=seg % per == 0 and k % seg == 0 and nw % cfg.bw == 0, EVEN_N=n % cfg.bn == 0,
                HIGH_SHIFT=high_shift(bits), INT_PATH=int_path,
                A_OFFSET=int_path and not act_center_exact(act_bits, act_symmetric), HAS_BIAS=has_bias,
                ATOMIC=split > 1, BN=cfg.bn, BW=cfg.bw, N_ALIGNED=n % 16 == 0, PREFETCH=cfg.prefetch)


def _aot_compile(fn, ptr: dict, ints: tuple, const: dict, num_warps: int, num_stages: int, arch: int):
    """Compile a kernel for sm_<arch> without a GPU (Triton ships ptxas): 16-byte aligned pointers, as Triton's
    launcher specializes them at run time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**ptr, **{a: "i32" for a in ints}, **{c: "constexpr" for c in const}}
    names = fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ptr}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                num_stages=num_stages))


def _aot_pointers(int_path: bool, x_dtype: torch.dtype, has_bias: bool) -> dict:
    from abqllm.kernels.triton_linear import _TRITON_TYPE
    xt = _TRITON_TYPE[x_dtype]
    return dict(x_ptr="*i8" if int_path else f"*{xt}", sx_ptr="*fp32" if int_path else "*fp16",
                ax_ptr="*i32" if int_path else "*fp16", qw_ptr="*i32", sw_ptr="*fp16", zw_ptr="*u8",
                bias_ptr=f"*{xt}" if has_bias else "*fp16", y_ptr=f"*{xt}")


def aot_compile_kp(m: int, n: int, k: int, bits: int, group_size: int, act_bits: int, act_symmetric: bool = False,
                   has_bias: bool = False, x_dtype: torch.dtype = torch.float16, config: KpConfig | None = None,
                   sms: int = 132, arch: int = 90):
    """Compile the kp_gemv_kernel launch that kp_gemv would make, for sm_<arch>, without a GPU.
    Returns triton's CompiledKernel (.asm: ttgir, ptx, cubin)."""
    cfg = config or default_kp_config(bits, group_size, k, n)
    nw = -(-k // KP.segment_length(k, group_size)) * KP.words_per_segment(k, group_size, bits)
    _, split, _ = kp_plan(m, n, nw, cfg, sms)
    const = kp_constexprs(bits, group_size, k, n, act_bits, act_symmetric, has_bias, split, cfg)
    ptr = _aot_pointers(act_bits != 16, x_dtype, has_bias)
    ptr.update(ws_ptr="*fp32" if split > 1 else "*fp16", cnt_ptr="*i32" if split > 1 else "*fp16")
    return _aot_compile(_kernel(), ptr, ("N", "K", "SEG", "NW", "stride_xm", "stride_ym", "SPLIT", "BLOCKS_PER_SPLIT",
                                         "MAGIC"), const, cfg.num_warps, cfg.num_stages, arch)


def aot_compile_kp_gemm(m: int, n: int, k: int, bits: int, group_size: int, act_bits: int,
                        act_symmetric: bool = False, has_bias: bool = False, x_dtype: torch.dtype = torch.float16,
                        config: KpGemmConfig | None = None, sms: int = 132, arch: int = 90):
    """Compile the kp_gemm_kernel launch that kp_gemm would make, for sm_<arch>, without a GPU."""
    from abqllm.kernels import triton_kpacked
    cfg = config or default_kp_gemm_config(m, False)
    nw = -(-k // KP.segment_length(k, group_size)) * KP.words_per_segment(k, group_size, bits)
    _, split, _ = kp_gemm_plan(m, n, nw, cfg.bkw or gemm_bkw(bits, group_size, k), cfg, sms)
    const = kp_gemm_constexprs(bits, group_size, k, act_bits, act_symmetric, has_bias, x_dtype, cfg, False, split)
    ptr = _aot_pointers(act_bits != 16, x_dtype, has_bias)
    ptr.update(ws_ptr="*fp32" if split > 1 else "*fp16", cnt_ptr="*i32" if split > 1 else "*fp16")
    return _aot_compile(triton_kpacked.kp_gemm_kernel, ptr,
                        ("M", "N", "K", "SEG", "NW", "stride_xm", "stride_ym", "SPLIT", "STEPS_PER_SPLIT"), const,
                        cfg.num_warps, cfg.num_stages, arch)
