"""The CUDA binary (bit-plane) path, built at run time and called through ctypes.

`abq_bmma.cu` holds plain CUDA C++ kernels (see its header for layouts and arithmetic): an activation
quantizer that writes bit planes and per-group code sums, a repack of the plain packed weights into bit
planes, and the WpAq linear as p*q `mma.sync.m8n8k128.b1.and.popc` products plus the zero-point/scale
epilogue. `library()` compiles it with nvcc into a shared library for the current GPU's architecture
(cached under $ABQLLM_CACHE or ~/.cache/abqllm, keyed by the source hash, the architecture and nvcc's
version) and loads it with ctypes; kernels run on torch's current stream, so they work inside CUDA graphs.

Registered as linear kernel 'cuda' at priority 5, so `auto` never picks it over 'triton' or 'torch':
name it explicitly (layer.kernel = 'cuda'). Supports: a CUDA device of compute capability >= 8.0 with
nvcc available, integer activations (q = 2..8; A16 has no binary form), weight storage bits 1..8, any
group size that is a multiple of 32 (or per-channel), any M, N, K.

The bit planes take as many bytes as the packed weights; they are built on first use and cached per
layer (keyed by the layer object, rebuilt when its buffers change), so a layer that runs this path holds
its weights twice on the GPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from abqllm.errors import AbqError
from abqllm.kernels.registry import register

SOURCE = Path(__file__).with_name("abq_bmma.cu")
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_LOCK = threading.Lock()


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def nvcc_command(nvcc: str, arch: str, out: Path, *, shared: bool = True, source: Path = SOURCE) -> list[str]:
    """The build command; `arch` like '90' (sm_90). Also used by the CPU test that only compiles."""
    cmd = [nvcc, "-O3", "-std=c++17", "-lineinfo", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    cmd += ["-shared", "-Xcompiler", "-fPIC"] if shared else ["-c"]
    return cmd + [str(source), "-o", str(out)]


def _cache_dir() -> Path:
    root = os.environ.get("ABQLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "abqllm")
    return Path(root) / "cuda"


def build(arch: str, nvcc: str | None = None, source: Path = SOURCE) -> Path:
    """Compile `source` (abq_bmma.cu unless given) for sm_<arch> (cached); returns the shared library's path."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise AbqError("the CUDA kernels need nvcc (set CUDA_HOME or put nvcc on PATH)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(source.read_bytes() + arch.encode() + version.encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}_sm{arch}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp.so")
    proc = subprocess.run(nvcc_command(nvcc, arch, tmp, source=source), capture_output=True, text=True)
    if proc.returncode:
        raise AbqError(f"nvcc failed to build {source.name} for sm_{arch}:\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders never load a half-written library
    return out


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


@functools.cache
def _library(arch: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(arch)))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.abq_act_quant_pack.argtypes = [p, i, i, i, i, i, i, p, p, i, i, p, p, p, p, p]
    lib.abq_repack_bitplanes.argtypes = [p, i, i, i, i, i, p, p, p]
    lib.abq_bmma_linear.argtypes = [p, p, p, p, i, i, p, p, p, p, p, p, i, i, i, i, i, i, i, p]
    for fn in (lib.abq_act_quant_pack, lib.abq_repack_bitplanes, lib.abq_bmma_linear):
        fn.restype = ctypes.c_int
    lib.abq_error_string.argtypes = [i]
    lib.abq_error_string.restype = ctypes.c_char_p
    return lib


def library(device: torch.device) -> ctypes.CDLL:
    with _LOCK:
        return _library(_arch(device))


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code:
        raise RuntimeError(f"{what} failed: CUDA error {code} ({lib.abq_error_string(code).decode()})")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ---- the pieces ---------------------------------------------------------------------------------

def _groups(k: int, group_size: int) -> tuple[int, int]:
    """(gs_words, G): words per group (0 = per-channel) and the number of groups."""
    if group_size % 32:
        raise ValueError(f"the bit-plane kernels need group_size % 32 == 0, got {group_size}")
    return group_size // 32, (1 if group_size == 0 else -(-k // group_size))


def act_quant_pack(x: torch.Tensor, bits: int, symmetric: bool, group_size: int,
                   act_scale: torch.Tensor | None = None, act_zero: torch.Tensor | None = None):
    """x [M, K] -> (planes int32 [q, M, KW], code sums int32 [M, G], scale f32 [M], zero f32 [M])."""
    x = x.contiguous()
    m, k = x.shape
    gs_words, g = _groups(k, group_size)
    kw = -(-k // 32)
    dev = x.device
    planes = torch.empty(bits, m, kw, dtype=torch.int32, device=dev)
    sums = torch.empty(m, g, dtype=torch.int32, device=dev)
    sx = torch.empty(m, dtype=torch.float32, device=dev)
    zx = torch.empty(m, dtype=torch.float32, device=dev)
    if m == 0:
        return planes, sums, sx, zx
    if act_scale is not None:
        act_scale, act_zero = act_scale.float().reshape(1).contiguous(), act_zero.float().reshape(1).contiguous()
    lib = library(dev)
    _check(lib, lib.abq_act_quant_pack(x.data_ptr(), _DTYPE_CODE[x.dtype], x.stride(0), m, k, bits, int(symmetric),
                                       _ptr(act_scale), _ptr(act_zero), gs_words, g, planes.data_ptr(),
                                       sums.data_ptr(), sx.data_ptr(), zx.data_ptr(), _stream(dev)),
           "abq_act_quant_pack")
    return planes, sums, sx, zx


def repack_bitplanes(qweight: torch.Tensor, in_features: int, storage_bits: int, group_size: int):
    """Plain packed qweight [N, Kpad/32*p] -> (planes int32 [p, N, KW], code sums int32 [N, G])."""
    n = qweight.shape[0]
    k = in_features
    gs_words, g = _groups(k, group_size)
    kw = -(-k // 32)
    if qweight.shape[1] != kw * storage_bits:
        raise ValueError(f"qweight has {qweight.shape[1]} words per row, expected {kw * storage_bits}")
    dev = qweight.device
    planes = torch.empty(storage_bits, n, kw, dtype=torch.int32, device=dev)
    sums = torch.empty(n, g, dtype=torch.int32, device=dev)
    lib = library(dev)
    _check(lib, lib.abq_repack_bitplanes(qweight.contiguous().data_ptr(), n, k, storage_bits, gs_words, g,
                                         planes.data_ptr(), sums.data_ptr(), _stream(dev)), "abq_repack_bitplanes")
    return planes, sums


# Bit planes per layer, keyed by the qweight tensor (weakly: dropped with the layer's buffer) and
# rebuilt when its version counter moves (the buffer was written in place).
_PLANES = WeakTensorKeyDictionary()


def weight_planes(qweight: torch.Tensor, in_features: int, storage_bits: int, group_size: int):
    hit = _PLANES.get(qweight)
    if hit is not None and hit[0] == qweight._version:
        return hit[1], hit[2]
    planes, sums = repack_bitplanes(qweight, in_features, storage_bits, group_size)
    if not torch.cuda.is_current_stream_capturing():
        _PLANES[qweight] = (qweight._version, planes, sums)
    return planes, sums


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            bias: torch.Tensor | None, act_scale: torch.Tensor | None, act_zero: torch.Tensor | None,
            in_features: int, storage_bits: int, group_size: int, act_bits: int, act_symmetric: bool) -> torch.Tensor:
    """y = Q_a(x) @ W^T + bias through bit-plane AND+popcount tensor-core products (integer activations only)."""
    if act_bits == 16:
        raise ValueError("the bit-plane kernel needs integer activations (A2..A8)")
    shape = x.shape
    k, n = in_features, qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.dtype not in _DTYPE_CODE:
        x2 = x2.float()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x.device)
    if m == 0:
        return y.reshape(*shape[:-1], n)
    wp, wsum = weight_planes(qweight, k, storage_bits, group_size)
    xp, xsum, sx, zx = act_quant_pack(x2, act_bits, act_symmetric, group_size, act_scale, act_zero)
    gs_words, g = _groups(k, group_size)
    bias32 = bias.float().contiguous() if bias is not None else None
    lib = library(x.device)
    _check(lib, lib.abq_bmma_linear(xp.data_ptr(), xsum.data_ptr(), sx.data_ptr(), zx.data_ptr(), m, act_bits,
                                    wp.data_ptr(), wsum.data_ptr(), scales.contiguous().data_ptr(),
                                    zeros.contiguous().data_ptr(), _ptr(bias32), y.data_ptr(), _DTYPE_CODE[y.dtype],
                                    y.stride(0), n, k, storage_bits, gs_words, g, _stream(x.device)),
           "abq_bmma_linear")
    return y.to(x.dtype).reshape(*shape[:-1], n)


def supports(layer, device: torch.device) -> bool:
    spec = layer.spec
    if device.type != "cuda" or spec.act.is_float or spec.weight.group_size % 32:
        return False
    if not 1 <= spec.weight.storage_bits <= 8 or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8 and find_nvcc() is not None


@register("linear", "cuda", priority=5, supports=supports)
def linear_cuda(layer, x: torch.Tensor) -> torch.Tensor:
    """ABQ's binary path: p*q bit-plane products with mma.sync b1 AND+popc, zero-point epilogue included."""
    from abqllm.kernels import custom_ops
    from abqllm.kernels.triton_linear import layer_args
    return custom_ops.bmma_qlinear(x, **layer_args(layer))
