"""Triton implementation of the 'linear' op (and the activation quantizer it uses), for every WpAq.

Registered as linear kernel 'triton' (priority 20: `auto` picks it over 'torch' wherever it applies).
Supports: weight storage bits 1..8 (balanced W_p* included: stored and computed as p+1-bit codes),
activations q in 2..8 (integer path: int8 operands, int32 accumulation) or 16 (float path, x in
fp16/bf16/fp32), per-channel scales or groups whose size is a multiple of 32 (a shorter last group,
K % group_size != 0, is fine), any M, N, K (K need not be a multiple of 32), dynamic per-token or static
per-tensor activation scales, optional bias. Device: CUDA; on the CPU only inside Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported), which is how the CPU test suite runs these kernels.

The kernels read the checkpoint's plain packed layout directly: there is no second weight layout and
no repack at load time. Arithmetic and layouts: see triton_kernels.py. The entry points here are plain
functions on tensors; kernels/custom_ops.py wraps them as torch.library ops for torch.compile and CUDA
graphs, and the registered 'linear' kernel calls those ops.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, replace

import torch

from abqllm.formats.packing import WORD
from abqllm.kernels.registry import register

# Per-channel integer segments (one per split) are at most FLUSH_COLS columns long so that the int32 sums
# cannot overflow: |each of the four terms| <= 128 * 128 * FLUSH_COLS, their sum < 2^31.
FLUSH_COLS = 16384
INT8_MAX_BITS = 8
# Decode grids: split K until about this many programs per SM (a memory-bound GEMV needs many bytes in flight).
DECODE_PROGRAMS_PER_SM = 8


@dataclass(frozen=True)
class Config:
    """Tile shape and launch parameters of one qlinear_kernel launch."""
    bm: int
    bn: int
    bk: int
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of gemv_kernel (the decode path for 1/2/4/8-bit storage): BN rows per program,
    `words` packed words of each row per loop iteration (rounded to whole groups), split_k = 0: automatic."""
    bn: int = 32
    words: int = 32
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 2
    vec_words: int = 4  # words per row a thread expands at once (4 = one 16-byte load); < CW keeps sums in-thread


GEMV_BITS = (1, 2, 4, 8)
# Widths for which `auto` takes the GEMV at M = 1: only where it measured faster than qlinear_kernel's M = 1
# path on the H100 (benchmarks/results/gpu_h100_2026-11-28_gemv, N = K = 8192: W2A16 44.3 vs 49.9 us, W2A8
# 48.8 vs 74.7 us; but W4A16 93.5 vs 68.4, W8A8 175.3 vs 112.4). Both are far from the memory roofline.
GEMV_AUTO_BITS = (2,)
GEMV_MAX_M = 1  # rows up to which `auto` takes the GEMV (each row re-streams the weights)
# Automatic split-K of the GEMV: enough programs for this many per SM.
GEMV_PROGRAMS_PER_SM = 4


def default_gemv_config(storage_bits: int) -> GemvConfig:
    """Chosen without a GPU, from the sm_90 SASS of the K loop (benchmarks/gpu/gemv_sass.py ->
    benchmarks/results/gemv_sass_w{2,4,8}a16.json): the fewest instructions per code with no spills and no
    shuffles in the loop. 4/8 bits: 6.2/5.7 per code at 128 rows x 2 warps; 2 bits: 6.6 at 32 rows x 1 warp
    (wider tiles spill). Not yet timed on a GPU."""
    if storage_bits <= 2:
        return GemvConfig(bn=32, words=16, num_warps=1)
    return GemvConfig(bn=128, words=16, num_warps=2)


def gemv_supported(storage_bits: int, group_size: int) -> bool:
    """Power-of-two storage widths, per-channel or groups spanning a power-of-two number of words."""
    if storage_bits not in GEMV_BITS:
        return False
    words = group_size * storage_bits // WORD
    return group_size == 0 or (words > 0 and words & (words - 1) == 0)


def gemv_plan(k: int, n: int, storage_bits: int, group_size: int, cfg: GemvConfig, sms: int) -> dict:
    """NG groups of CW words (PER codes each) per iteration, and the split: `split` programs along K, each
    `chunks_per_split` iterations long (splits start on chunk boundaries)."""
    per_word = WORD // storage_bits
    if group_size:
        cw = group_size * storage_bits // WORD
        ng = max(1, triton_next_pow2(cfg.words) // cw)
    else:
        cw, ng = triton_next_pow2(cfg.words), 1
    chunk = ng * cw * per_word
    units = -(-k // chunk)
    split = cfg.split_k or max(1, GEMV_PROGRAMS_PER_SM * sms // max(1, -(-n // cfg.bn)))
    split = max(1, min(units, split))
    per = -(-units // split)
    return dict(NG=ng, CW=cw, PER=per_word, split=-(-units // per), chunks_per_split=per)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels():
    from abqllm.kernels import triton_kernels  # imports triton; kept out of `import abqllm`
    return triton_kernels


def shape_supported(storage_bits: int, act_bits: int, group_size: int) -> bool:
    return 1 <= storage_bits <= INT8_MAX_BITS and (act_bits == 16 or 2 <= act_bits <= 8) and group_size % WORD == 0


def supports(layer, device: torch.device) -> bool:
    on_device = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if not on_device or not have_triton():
        return False
    spec = layer.spec
    return shape_supported(spec.weight.storage_bits, spec.act.bits, spec.weight.group_size)


# ---- activation quantization --------------------------------------------------------------------

def act_center_exact(bits: int, symmetric: bool) -> bool:
    """Whether u - z fits int8 for every code (then the kernels need no activation offset term)."""
    return bits <= 7 or symmetric


def act_quant(x: torch.Tensor, bits: int, symmetric: bool, act_scale: torch.Tensor | None = None,
              act_zero: torch.Tensor | None = None,
              out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize rows of x [M, K] to q-bit codes u (as act_qparams/quantize_act do), centred for int8.

    Returns xq int8 [M, K] = u - c, the scale s float32 [M] and a int32 [M] = c - z, where c = z when
    u - z fits int8 (a = 0) and c = 2^(q-1) otherwise (q = 8 asymmetric). So u - z = xq + a.
    With act_scale/act_zero (float32 [1]) the scale is static per tensor instead of per token.
    `out` (xq, s, a) are written in place when given (tests pass poisoned buffers).
    """
    if x.dim() != 2:
        raise ValueError(f"act_quant expects [M, K], got {tuple(x.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be 2..8 for the integer path, got {bits}")
    x = x.contiguous()
    m, k = x.shape
    if out is None:
        out = (torch.empty(m, k, dtype=torch.int8, device=x.device), torch.empty(m, dtype=torch.float32, device=x.device),
               torch.empty(m, dtype=torch.int32, device=x.device))
    xq, sx, ax = out
    if m == 0:
        return xq, sx, ax
    static = act_scale is not None
    if static:
        s_static, z_static = act_scale.float().reshape(1), act_zero.float().reshape(1)
    else:
        s_static = z_static = sx  # unused
    const = act_quant_constexprs(k, bits, symmetric, static, interpreting())
    _kernels().act_quant_kernel[(m,)](x, xq, sx, ax, s_static, z_static, k, x.stride(0), **const,
                                      num_warps=4 if const["BLOCK"] <= 1024 else 8)
    return xq, sx, ax


def act_quant_constexprs(k: int, bits: int, symmetric: bool, static: bool, interpret: bool) -> dict:
    from abqllm.quant.primitives import MIN_ACT_SCALE
    block = min(256 if interpret else 4096, max(32, triton_next_pow2(k)))
    return dict(QMAX=2 ** bits - 1, HALF=2 ** (bits - 1), SYMMETRIC=symmetric, STATIC=static,
                CENTER_EXACT=act_center_exact(bits, symmetric), MIN_SCALE=MIN_ACT_SCALE, BLOCK=block)


def aot_compile_act_quant(k: int, bits: int, symmetric: bool = False, static: bool = False,
                          x_dtype: torch.dtype = torch.float16, arch: int = 90):
    """Compile act_quant_kernel for sm_<arch> without a GPU (see aot_compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    const = act_quant_constexprs(k, bits, symmetric, static, False)
    fn = _kernels().act_quant_kernel
    ptr = dict(x_ptr=f"*{_TRITON_TYPE[x_dtype]}", xq_ptr="*i8", sx_ptr="*fp32", ax_ptr="*i32", s_static_ptr="*fp32",
               z_static_ptr="*fp32")
    sig = {**ptr, "K": "i32", "stride_xm": "i32", **{c: "constexpr" for c in const}}
    names = fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ptr}
    attrs.update({(names.index(a),): [["tt.divisibility", 16]] for a in ("K", "stride_xm") if k % 16 == 0})
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=4 if const["BLOCK"] <= 1024 else 8))


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---- the linear kernel --------------------------------------------------------------------------

@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bk_for(group_size: int, preferred: int) -> int:
    """Largest power of two <= preferred that divides the group size (any if per-channel)."""
    if group_size == 0:
        return preferred
    bk = preferred
    while group_size % bk:
        bk //= 2
    return bk


def default_config(m: int, n: int, k: int, group_size: int, int_path: bool, device: torch.device) -> Config:
    """Heuristic tiles. Decode (M <= 16): split-K so that about 8 programs run per SM; M = 1 on CUDA
    cores (gemlite-style GEMV), M = 2..16 with tl.dot at BM = 16. Prefill: large tiles, SPLIT_K = 1.
    These are untuned guesses (no GPU has run them yet); benchmarks/gpu_suite.py times alternatives."""
    if device.type != "cuda":  # interpreter: small tiles keep the CPU tests fast and cover split-K
        # (the CUDA-core path costs the interpreter the same per tile whatever BK is: give it wide tiles)
        bk = _bk_for(group_size, 256 if m == 1 else 32)
        cfg = Config(bm=1 if m == 1 else 16 if m <= 16 else 32, bn=32, bk=bk, use_dot=m > 1)
        return _with_split(cfg, m, n, k, group_size, target_programs=4) if m <= 16 else cfg
    if m > 16:
        return _gpu_prefill_config(m, group_size, int_path)
    return _with_split(_gpu_decode_config(m, group_size), m, n, k, group_size,
                       target_programs=DECODE_PROGRAMS_PER_SM * _num_sms(device.index or 0))


def _gpu_decode_config(m: int, group_size: int) -> Config:
    if m == 1:
        return Config(bm=1, bn=64, bk=_bk_for(group_size, 128), use_dot=False, num_warps=4, num_stages=2)
    return Config(bm=16, bn=64, bk=_bk_for(group_size, 128), num_warps=4, num_stages=3)


def _gpu_prefill_config(m: int, group_size: int, int_path: bool) -> Config:
    # BM = 128 spilled registers in ptxas's report for 4-bit weights (BM = 64 did not); untimed.
    return Config(bm=64, bn=128, bk=_bk_for(group_size, 128 if int_path else 64), num_warps=8, num_stages=3)


def _with_split(cfg: Config, m: int, n: int, k: int, group_size: int, target_programs: int) -> Config:
    tiles = -(-m // cfg.bm) * -(-n // cfg.bn)
    unit = group_size if group_size else cfg.bk
    units = -(-k // unit)
    split = max(1, min(units, target_programs // max(1, tiles)))
    return replace(cfg, split_k=split)


def split_plan(k: int, group_size: int, cfg: Config, int_path: bool = True) -> tuple[int, int]:
    """(split_k, K_PER_SPLIT): splits start on group boundaries, none is empty, and per-channel integer
    splits are at most FLUSH_COLS columns long."""
    unit = group_size if group_size else cfg.bk
    units = -(-k // unit)
    split = max(1, min(cfg.split_k, units))
    if int_path and group_size == 0:
        split = max(split, -(-k // (FLUSH_COLS // cfg.bk * cfg.bk)))
    per = -(-units // split) * unit
    return -(-k // per), per


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            bias: torch.Tensor | None, act_scale: torch.Tensor | None, act_zero: torch.Tensor | None,
            in_features: int, storage_bits: int, group_size: int, act_bits: int, act_symmetric: bool,
            config: Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = Q_a(x) @ W^T + bias with W = s_w * (w - z_w) read from the plain packed layout.

    x [..., K] (any float dtype) -> y [..., N] in x's dtype. The reference is kernels/reference.py.
    `config` overrides the tile heuristics; `out` (contiguous, [..., N], x's dtype) receives y when given.
    """
    if not shape_supported(storage_bits, act_bits, group_size):
        raise ValueError(f"triton qlinear does not support W(storage {storage_bits} bits) A{act_bits} g{group_size}")
    shape = x.shape
    k, n = in_features, qweight.shape[0]
    if shape[-1] != k:
        raise ValueError(f"x has {shape[-1]} features, layer expects {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    int_path = act_bits != 16
    use_gemv = isinstance(config, GemvConfig) or (config is None and 0 < m <= GEMV_MAX_M
                                                   and storage_bits in GEMV_AUTO_BITS
                                                   and gemv_supported(storage_bits, group_size))
    if use_gemv:
        if not gemv_supported(storage_bits, group_size):
            raise ValueError(f"the GEMV path needs 1/2/4/8-bit storage and power-of-two words per group, "
                             f"got {storage_bits} bits, group size {group_size}")
        cfg = config or default_gemv_config(storage_bits)
        sms = _num_sms(x.device.index or 0) if x.device.type == "cuda" else 4
        plan = gemv_plan(k, n, storage_bits, group_size, cfg, sms)
        split = plan["split"]
    else:
        cfg = config or default_config(m, n, k, group_size, int_path, x.device)
        if group_size and cfg.bk > group_size:  # the kernel steps through each group in whole BK tiles
            cfg = replace(cfg, bk=_bk_for(group_size, cfg.bk))
        split, k_per_split = split_plan(k, group_size, cfg, int_path)
    out_dtype = x.dtype
    if out is not None and (out.dtype != out_dtype or not out.is_contiguous() or out.numel() != m * n):
        raise ValueError("out must be a contiguous tensor of x's dtype with [..., N] elements")
    if split > 1:  # split-K partials meet in a zeroed float32 buffer
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    elif out is not None:
        y = out.view(m, n)
    else:
        y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return y.to(out_dtype).reshape(*shape[:-1], n)
    if int_path:
        a_in, sx, ax = act_quant(x2, act_bits, act_symmetric, act_scale, act_zero)
    else:
        a_in, sx, ax = x2, scales, scales  # sx/ax unused on the float path
    kw, sxm = qweight.shape[1], a_in.stride(0)
    aligned = k % 16 == 0 and kw % 4 == 0 and sxm % 16 == 0
    if aligned:  # see qlinear_kernel: passed divided, multiplied back inside
        k_arg, kw_arg, sxm_arg = k // 16, kw // 4, sxm // 16
    else:
        k_arg, kw_arg, sxm_arg = k, kw, sxm
    bias_arg = bias if bias is not None else scales
    if use_gemv:
        _kernels().gemv_kernel[(-(-n // cfg.bn), m, split)](
            a_in, sx, ax, qweight, scales, zeros, bias_arg, y,
            n, k_arg, kw_arg, scales.shape[1], sxm_arg, y.stride(0), plan["chunks_per_split"],
            **gemv_constexprs(storage_bits, group_size, act_bits, act_symmetric, bias is not None, split, cfg, plan,
                              aligned),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _kernels().qlinear_kernel[(-(-m // cfg.bm) * -(-n // cfg.bn), split)](
            a_in, sx, ax, qweight, scales, zeros, bias_arg, y,
            m, n, k_arg, kw_arg, scales.shape[1], sxm_arg, y.stride(0), k_per_split,
            **qlinear_constexprs(storage_bits, group_size, act_bits, act_symmetric, bias is not None, x.dtype, split,
                                 cfg, interpreting(), aligned=aligned),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        y = out.view(m, n).copy_(y) if out is not None else y.to(out_dtype)
    return y.reshape(*shape[:-1], n)


def gemv_constexprs(storage_bits, group_size, act_bits, act_symmetric, has_bias, split, cfg, plan, aligned) -> dict:
    int_path = act_bits != 16
    return dict(BITS=storage_bits, GS=group_size, INT_PATH=int_path,
                A_OFFSET=int_path and not act_center_exact(act_bits, act_symmetric), HAS_BIAS=has_bias,
                ATOMIC=split > 1, BN=cfg.bn, NG=plan["NG"], CW=plan["CW"], PER=plan["PER"],
                VW=min(plan["CW"], cfg.vec_words), ALIGNED=aligned)


def qlinear_constexprs(storage_bits: int, group_size: int, act_bits: int, act_symmetric: bool, has_bias: bool,
                       x_dtype: torch.dtype, split: int, cfg: Config, interpret: bool, aligned: bool) -> dict:
    """The compile-time parameters of qlinear_kernel for one launch (shared by the launcher and aot_compile)."""
    int_path = act_bits != 16
    # Float path: tensor-core dot in fp16/bf16; other dtypes (fp32, fp64) as an fp32 "ieee" dot. Triton's
    # interpreter multiplies bf16 as raw uint16 bits in tl.dot (triton 3.6/3.7), so it gets the fp32 dot too.
    dot_f32 = not int_path and (x_dtype not in (torch.float16, torch.bfloat16) or (interpret and x_dtype == torch.bfloat16))
    return dict(BITS=storage_bits, GS=group_size, INT_PATH=int_path, W_EXACT=storage_bits <= 7,
                A_OFFSET=int_path and not act_center_exact(act_bits, act_symmetric), HAS_BIAS=has_bias,
                ATOMIC=split > 1, USE_DOT=cfg.use_dot, DOT_F32=dot_f32, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
                GROUP_M=cfg.group_m, WORDS_P=triton_next_pow2(cfg.bk // 32 * storage_bits), ALIGNED=aligned)


_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _aot_pointer_types(int_path: bool, x_dtype: torch.dtype, has_bias: bool, split: int) -> dict:
    """Triton pointer types of the linear kernels' arguments, as the launcher passes them (both kernels)."""
    xt = _TRITON_TYPE[x_dtype]
    return dict(x_ptr="*i8" if int_path else f"*{xt}", sx_ptr="*fp32" if int_path else "*fp16",
                ax_ptr="*i32" if int_path else "*fp16", qw_ptr="*i32", sw_ptr="*fp16", zw_ptr="*u8",
                bias_ptr=f"*{xt}" if has_bias else "*fp16", y_ptr="*fp32" if split > 1 else f"*{xt}")


def aot_compile(m: int, n: int, k: int, storage_bits: int, group_size: int, act_bits: int, act_symmetric: bool = False,
                has_bias: bool = False, x_dtype: torch.dtype = torch.float16, config: Config | None = None,
                arch: int = 90):
    """Compile the qlinear_kernel launch that `qlinear` would make for these sizes, for sm_<arch>, without a GPU
    (Triton ships ptxas). Returns triton's CompiledKernel (.asm holds ttgir, ptx, cubin). Used by the CPU tests
    and benchmarks/gpu/aot_check.py to catch compile-only errors the interpreter cannot see."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    int_path = act_bits != 16
    cfg = config
    if cfg is None:  # what default_config picks on an H100 (132 SMs)
        cfg = (_gpu_prefill_config(m, group_size, int_path) if m > 16 else
               _with_split(_gpu_decode_config(m, group_size), m, n, k, group_size,
                           target_programs=DECODE_PROGRAMS_PER_SM * 132))
    split, k_per_split = split_plan(k, group_size, cfg, int_path)
    kw = -(-k // 32) * storage_bits
    const = qlinear_constexprs(storage_bits, group_size, act_bits, act_symmetric, has_bias, x_dtype, split, cfg, False,
                               aligned=kw % 4 == 0 and k % 16 == 0)
    ptr = _aot_pointer_types(int_path, x_dtype, has_bias, split)
    fn = _kernels().qlinear_kernel
    sig = {**ptr, **{a: "i32" for a in ("M", "N", "K", "KW", "G", "stride_xm", "stride_ym", "K_PER_SPLIT")},
           **{c: "constexpr" for c in const}}
    names = fn.arg_names
    # What Triton's launcher specializes at run time: 16-byte aligned pointers (sizes are not specialized).
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ptr}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def aot_compile_gemv(n: int, k: int, storage_bits: int, group_size: int, act_bits: int, act_symmetric: bool = False,
                     has_bias: bool = False, x_dtype: torch.dtype = torch.float16, config: GemvConfig | None = None,
                     arch: int = 90):
    """Compile the gemv_kernel launch for sm_<arch> without a GPU (as aot_compile does for qlinear_kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = config or default_gemv_config(storage_bits)
    plan = gemv_plan(k, n, storage_bits, group_size, cfg, 132)
    int_path = act_bits != 16
    kw = -(-k // 32) * storage_bits
    const = gemv_constexprs(storage_bits, group_size, act_bits, act_symmetric, has_bias, plan["split"], cfg, plan,
                            aligned=kw % 4 == 0 and k % 16 == 0)
    ptr = _aot_pointer_types(int_path, x_dtype, has_bias, plan["split"])
    fn = _kernels().gemv_kernel
    sig = {**ptr, **{a: "i32" for a in ("N", "K", "KW", "G", "stride_xm", "stride_ym", "CHUNKS_PER_SPLIT")},
           **{c: "constexpr" for c in const}}
    names = fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ptr}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def layer_args(layer) -> dict:
    """The QuantLinear buffers and scheme as the keyword arguments of `qlinear`."""
    spec = layer.spec
    return dict(qweight=layer.qweight, scales=layer.scales, zeros=layer.zeros, bias=layer.bias,
                act_scale=getattr(layer, "act_scale", None), act_zero=getattr(layer, "act_zero", None),
                in_features=layer.in_features, storage_bits=spec.weight.storage_bits,
                group_size=spec.weight.group_size, act_bits=spec.act.bits, act_symmetric=spec.act.symmetric)


@register("linear", "triton", priority=20, supports=supports)
def linear_triton(layer, x: torch.Tensor) -> torch.Tensor:
    """Packed weights unpacked in registers; int8 tensor cores for q <= 8, fp16/bf16 for A16. On CUDA: the
    k-packed GEMV for decode (M <= KP_MAX_M) and, once DENSE_MIN_M is set, the dense path for prefill."""
    from abqllm.kernels import custom_ops, dense_prefill, kpacked_linear
    if kpacked_linear.use_gemv(x):  # decode on CUDA: the k-packed GEMV
        return custom_ops.kp_gemv(x, **kpacked_linear.layer_kp_args(layer))
    if dense_prefill.use_dense(x):  # prefill on CUDA: expanded weights, cuBLAS GEMM
        return custom_ops.dense_qlinear(x, **kpacked_linear.layer_kp_args(layer))
    return custom_ops.triton_qlinear(x, **layer_args(layer))
