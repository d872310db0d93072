"""The hand-written CUDA decode GEMV on the k-packed layout (kernels/cuda/abq_gemv.cu), through ctypes.

Why a CUDA version beside the Triton one (triton_kpacked.kp_gemv_kernel): the H200 run put the Triton GEMV at
4.0-5.4 instructions per code in its sm_90 SASS, and for 2-bit weights the issue floor (67M codes at 8192^2) is
above the memory floor. Here A8 takes one dp4a per four codes (1.3-1.7 instructions a code in all, against 5.4
for the Triton GEMV at W8A8; benchmarks/results/cuda_gemv_sass.json) and the float path three a code (LOP3, FADD,
FFMA; 3.4-4.1 in all), with the block's activations staged once in shared memory, four
16-byte weight loads in flight per thread, and a quarter of the atomics (the 4 warps of a block split K and meet
in shared memory first). Supports: storage bits 1..8 (dp4a for 1/2/4/8 at A2..A8; the float path for A16 and for
the odd widths' integer activations); fp16 or bf16 activations; per-channel or any group size; N a multiple of 4;
blocks of 1, 2 or 4 activation rows. Integer activations are quantized inside the kernel by default
(`fuse_act_quant`, act_quant's arithmetic), which saves act_quant's launch. Untimed: registered as linear kernel
'cuda-gemv', named only.

`library(device)` builds the source for the GPU's architecture with nvcc (cached like the bit-plane kernels);
`cuda_gemv(..., emulate=True)` runs the same kernel code on the CPU (abq_gemv_emulate, host pointers), which is
how the CPU test suite checks it.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import torch

from abqllm.errors import AbqError
from abqllm.kernels import cuda as CU
from abqllm.kernels import kpacked as KP
from abqllm.kernels.registry import register

SOURCE = Path(CU.__file__).with_name("abq_gemv.cu")
BITS = tuple(range(1, 9))
DP4A_BITS = (1, 2, 4, 8)  # codes never straddle a byte: the dp4a path
WARPS, UNROLL, TILE_N = 4, 4, 128  # as in abq_gemv.cu
BLOCKS_PER_SM = 4  # 16 resident warps per SM: one wave (untimed)
GEMV_MAX_M = 4  # rows up to which 'cuda-gemv' takes the GEMV (blocks of 4 rows read the weights once; untimed)
SHARED_LIMIT = 48 * 1024  # dynamic shared memory without opting in
_LOCK = threading.Lock()
_ARGS = ([ctypes.c_void_p] * 10 + [ctypes.c_int] * 14 + [ctypes.c_uint32] + [ctypes.c_int] * 4 + [ctypes.c_float]
         + [ctypes.c_void_p] * 2 + [ctypes.c_int])
_BIAS_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # the kernel reads the bias as it is stored
MAGIC = 0x4B000000  # 2^23: abq_gemv.cu's code-to-float constant, passed at run time (see Args there)


@functools.cache
def _load(arch: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(CU.build(arch, source=SOURCE)))
    lib.abq_gemv.argtypes = _ARGS + [ctypes.c_void_p]
    lib.abq_gemv_emulate.argtypes = list(_ARGS)
    lib.abq_gemv_shared_bytes.argtypes = [ctypes.c_int] * 4
    lib.abq_gemv_shared_bytes.restype = ctypes.c_size_t
    lib.abq_gemv_error_string.argtypes = [ctypes.c_int]
    lib.abq_gemv_error_string.restype = ctypes.c_char_p
    return lib


def library(device: torch.device | None = None) -> ctypes.CDLL:
    """The built library for `device`'s architecture; on the CPU (emulation) any build serves: sm_90."""
    with _LOCK:
        return _load(CU._arch(device) if device is not None and device.type == "cuda" else "90")


def slots(bits: int, dp4a: bool) -> int:
    return 8 // bits if dp4a else 32 // bits


def mode(bits: int, act_bits: int) -> int:
    """0: the float path on float x; 1: dp4a (integer activations, 1/2/4/8 bits); 2: the float path on xq + a."""
    if act_bits == 16:
        return 0
    return 1 if bits in DP4A_BITS else 2


def block_rows(m: int) -> int:
    """Activation rows a block takes (it reads its weights once for all of them): 1, 2 or 4."""
    return 1 if m <= 1 else 2 if m == 2 else 4


def shared_bytes(per: int, bits: int, dp4a: bool, rows: int) -> int:
    """As abq_gemv.cu's shared_bytes: staged x and its sums per row, code counts, the per-warp partials."""
    return (rows * per * (slots(bits, dp4a) + 1) * 4 + (per * 4 if dp4a else 0) + WARPS * rows * TILE_N * 4
            + 16 + 16 * rows)


def plan(m: int, n: int, nw: int, bits: int, dp4a: bool, sms: int,
         blocks_per_sm: int = BLOCKS_PER_SM) -> tuple[int, int]:
    """(words_per_split, splits): about `blocks_per_sm` blocks per SM, at least one unrolled step per warp, shared
    memory under 48 KB, and (dp4a) at most 32768 codes a warp so that the int32 sums cannot overflow."""
    rows = block_rows(m)
    tiles, rblocks = -(-n // TILE_N), -(-m // rows)
    want = max(1, blocks_per_sm * sms // max(1, tiles * rblocks))
    splits = max(1, min(want, nw // (WARPS * UNROLL)))
    per = -(-nw // splits)
    fixed = shared_bytes(0, bits, dp4a, rows)
    cap = (SHARED_LIMIT - fixed) // (shared_bytes(1, bits, dp4a, rows) - fixed)  # words that fit
    if dp4a:
        cap = min(cap, WARPS * 32768 // KP.codes_per_word(bits))
    per = max(1, min(per, cap))
    return per, -(-nw // per)


def cuda_gemv(x: torch.Tensor, qweight_t: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
              bias: torch.Tensor | None, act_scale: torch.Tensor | None, act_zero: torch.Tensor | None,
              in_features: int, bits: int, group_size: int, act_bits: int, act_symmetric: bool,
              out: torch.Tensor | None = None, words_per_split: int | None = None,
              blocks_per_sm: int = BLOCKS_PER_SM, fuse_act_quant: bool = True,
              emulate: bool = False) -> torch.Tensor:
    """y [..., N] = Q_a(x) @ W^T + bias for x fp16/bf16 [..., K], y in x's dtype. emulate=True runs the kernel's
    code on the CPU (CPU tensors); `words_per_split` overrides the split-K plan, `blocks_per_sm` steers it.
    fuse_act_quant (integer activations): the kernel quantizes x itself, as act_quant would, instead of a separate
    act_quant launch before it."""
    from abqllm.kernels.kpacked_linear import _num_sms, _prologue, workspace
    from abqllm.kernels.triton_linear import act_center_exact
    from abqllm.quant.primitives import MIN_ACT_SCALE
    if bits not in BITS:
        raise ValueError(f"cuda_gemv supports storage bits {BITS}, got {bits}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"cuda_gemv needs fp16 or bf16 activations, got {x.dtype}; use the 'triton' kernel")
    n = qweight_t.shape[1]
    if n % 4 or qweight_t.data_ptr() % 16 or not qweight_t.is_contiguous():
        raise ValueError("cuda_gemv needs N % 4 == 0 and a contiguous, 16-byte aligned qweight_t")
    if emulate != (x.device.type == "cpu"):
        raise ValueError("cuda_gemv runs CUDA tensors on the GPU, or CPU tensors with emulate=True")
    quant = fuse_act_quant and act_bits != 16
    out_shape, m, y, a_in, sx, ax = _prologue(x, qweight_t, scales_t, in_features, bits, group_size,
                                              16 if quant else act_bits, act_symmetric, act_scale, act_zero, out,
                                              "cuda_gemv")
    if m == 0:
        return y.reshape(out_shape)
    k, nw = in_features, qweight_t.shape[0]
    path = mode(bits, act_bits)
    sms = 4 if emulate else _num_sms(x.device.index or 0)
    per, splits = plan(m, n, nw, bits, path == 1, sms, blocks_per_sm)
    if words_per_split:
        per, splits = words_per_split, -(-nw // words_per_split)
    tiles, rows = -(-n // TILE_N), block_rows(m)
    if emulate:
        ws, cnt = torch.zeros(m * n), torch.zeros(m * tiles, dtype=torch.int32)
    else:
        ws, cnt = workspace(x.device, m * n, m * tiles)
    # read as stored (an fp16 bias under bf16 activations keeps every bit, and no cast runs per call)
    bias_c = bias if bias is None or (bias.dtype in _BIAS_KIND and bias.is_contiguous()) else bias.float().contiguous()
    static = None
    if quant and act_scale is not None:  # a static per-tensor range: float32 [1] scale and zero
        static = (act_scale.float().reshape(1).contiguous(), act_zero.float().reshape(1).contiguous())
    seg = KP.segment_length(k, group_size)
    wpg = KP.words_per_segment(k, group_size, bits)
    lib = library(None if emulate else x.device)
    args = [qweight_t.data_ptr(), scales_t.contiguous().data_ptr(), zeros_t.contiguous().data_ptr(),
            a_in.data_ptr(), sx.data_ptr() if path and not quant else None,
            ax.data_ptr() if path and not quant else None,
            bias_c.data_ptr() if bias_c is not None else None, y.data_ptr(), ws.data_ptr(), cnt.data_ptr(),
            m, n, k, seg, wpg, nw, a_in.stride(0), y.stride(0), bits, path, int(x.dtype == torch.bfloat16), rows,
            per, splits, MAGIC, int(quant), act_bits if quant else 8, int(act_symmetric),
            int(act_center_exact(act_bits, act_symmetric)) if quant else 1, MIN_ACT_SCALE,
            static[0].data_ptr() if static else None, static[1].data_ptr() if static else None,
            _BIAS_KIND[bias_c.dtype] if bias_c is not None else 0]
    if emulate:
        code = lib.abq_gemv_emulate(*args)
    else:
        code = lib.abq_gemv(*args, torch.cuda.current_stream(x.device).cuda_stream)
    if code:
        what = "unsupported width" if code == -1 else lib.abq_gemv_error_string(code).decode()
        raise RuntimeError(f"abq_gemv failed: {what} (code {code})")
    return y.reshape(out_shape)


def supports(layer, device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available() or CU.find_nvcc() is None:
        return False
    return layer.spec.weight.storage_bits in BITS and layer.out_features % 4 == 0


@register("linear", "cuda-gemv", priority=4, supports=supports, layout="kpacked")
def linear_cuda_gemv(layer, x: torch.Tensor) -> torch.Tensor:
    """Decode batches up to GEMV_MAX_M rows through the CUDA GEMV; more rows as 'triton-kpacked' serves them.
    Named only."""
    from abqllm.kernels import custom_ops
    from abqllm.kernels.kpacked_linear import layer_kp_args, linear_triton_kpacked, rows
    if 0 < rows(x) <= GEMV_MAX_M:
        if x.dtype not in (torch.float16, torch.bfloat16):
            raise AbqError(f"kernel 'cuda-gemv' needs fp16 or bf16 activations, got {x.dtype}; use kernel='triton'")
        return custom_ops.cuda_gemv(x, **layer_kp_args(layer))
    return linear_triton_kpacked(layer, x)
