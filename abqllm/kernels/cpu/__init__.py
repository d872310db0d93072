"""CPU kernels for packed weights: the `linear` op straight from the checkpoint's packed codes, and `act_quant`.

A small C++ extension (`abq_cpu_*.cpp`, see `abq_cpu.h` for the layouts and arithmetic) built at first use
with torch.utils.cpp_extension (g++ and ninja; 1-2 minutes once on 2 busy cores) into $ABQLLM_CACHE or
~/.cache/abqllm, keyed by the sources, flags, compiler name, torch and Python versions. Instruction sets are chosen at run time: AVX-512
(F/BW/VL/DQ + VNNI + VBMI: vpdpbusd products, vpermb/vpmultishiftqb expansion) where the CPU has it, else
AVX2+FMA+F16C, else portable scalar code (`ABQLLM_CPU_ISA=scalar|avx2|avx512` forces one; a level the CPU lacks
falls back to the best it has, with a warning). If the build fails, one warning is logged and `auto` keeps using
the `torch` path.
`ABQLLM_CPU_KERNELS=0` turns them off.

Registered as linear kernel `cpu` (priority 15: `auto` picks it on the CPU over `torch`, below `triton`).
Supports: weight storage bits 1..8 (W1..W8, balanced W_p* stored in p+1 bits), per-channel scales or groups
that are a multiple of 32 (a shorter last group is fine), any M, N, K; activations A16 (x in fp32, bf16 or
fp16; computed in fp32) or A2..A8 (dynamic per token or static per tensor, symmetric or not, quantized in
C++ exactly as quant/primitives.py does). No copy of the weights is made or cached: every call reads qweight.
Inputs that need gradients, and float64 inputs, go through the `torch` path (same values; autograd and
float64 arithmetic live there). Threads: torch's intra-op pool (torch.set_num_threads). Layout, arithmetic
and measurements: docs/kernels.md, section "CPU kernels".
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import threading
import time
import weakref
from pathlib import Path

import torch

from abqllm.kernels.registry import register

log = logging.getLogger("abqllm.kernels")

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "abq_cpu_ops.cpp", HERE / "abq_cpu_scalar.cpp", HERE / "abq_cpu_avx2.cpp", HERE / "abq_cpu_decode.cpp", HERE / "abq_cpu_avx512.cpp"]
HEADERS = [HERE / "abq_cpu.h", HERE / "abq_cpu_torch.h"]
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
LDFLAGS = ["-fopenmp"]
ISA = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
# Float path (A16): from this many tokens on, dequantize per call and use torch's matmul (measured:
# benchmarks/cpu_kernels.py; see docs/kernels.md). 0 = never.
MM_FROM_M = 16
_LOCK = threading.Lock()


class _Ops:
    """The op overloads, looked up once (torch.ops attribute chains cost microseconds per call)."""
    linear = linear_out = None  # torch.ops.abqllm_cpu.linear(.out): dispatcher, torch.compile, fake tensors
    eager = None  # the same C++ function bound directly with pybind11: ~3 us less per call
    module = None
    isa = 0


_OPS = _Ops()


def _cache_dir() -> Path:
    root = os.environ.get("ABQLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "abqllm")
    return Path(root) / "cpu"


def _build_key() -> str:
    h = hashlib.sha256()
    for p in SOURCES + HEADERS:
        h.update(p.name.encode() + p.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {os.environ.get('CXX', 'c++')}".encode())
    return h.hexdigest()[:16]


# A build older than this that still holds torch's build lock was killed mid-build (SIGKILL, OOM): the lock
# would make every later process wait forever, so it is removed.
STALE_LOCK_S = 600


def build() -> None:
    """Compile and load the extension (cached); registers torch.ops.abqllm_cpu. Raises on failure.

    A finished build (marked by `built.ok`, written after the library) is loaded directly: torch's
    cpp_extension.load takes a file lock even to find that nothing needs rebuilding, and a process killed
    while holding it (a test, a user's kill -9, the OOM killer) would leave every later process waiting.
    """
    key = _build_key()
    out = _cache_dir() / key
    name = f"abqllm_cpu_{key}"
    if (out / "built.ok").exists():
        try:
            _OPS.module = _load_built(out / f"{name}.so", name)
            return
        except (ImportError, OSError) as e:  # a damaged file: rebuild below
            log.warning("cached CPU kernels in %s do not load (%s); rebuilding", out, e)
            (out / "built.ok").unlink(missing_ok=True)
    from torch.utils import cpp_extension

    out.mkdir(parents=True, exist_ok=True)
    lock = out / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("removing a stale build lock %s (a build was killed %.0f s ago)", lock,
                    time.time() - lock.stat().st_mtime)
        lock.unlink(missing_ok=True)
    quiet = logging.getLogger("torch.utils.cpp_extension")  # its compiler warnings: the failure is reported once
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        _OPS.module = cpp_extension.load(name=name, sources=[str(s) for s in SOURCES],
                                         extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, extra_include_paths=[str(HERE)],
                                         build_directory=str(out), is_python_module=True, verbose=False)
    finally:
        quiet.setLevel(level)
    (out / "built.ok").write_text(key)


def _load_built(path: Path, name: str):
    """Import the compiled extension module `name` from `path` (its TORCH_LIBRARY ops register on load)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _why(e: Exception) -> str:
    """The informative line of a build error (compiler output is long; the first error line says it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "error" in low and "error building extension" not in low or "not found" in low:
            return ln[:300]
    return lines[-1][:300] if lines else type(e).__name__


@functools.cache
def _loaded() -> bool:
    if os.environ.get("ABQLLM_CPU_KERNELS", "1") == "0":
        log.info("CPU kernels turned off (ABQLLM_CPU_KERNELS=0)")
        return False
    try:
        if not _ops_registered():
            log.info("building the CPU kernels (first use, 1-2 minutes; cached in %s)", _cache_dir())
            build()
        _register_fake()
        _OPS.isa = _isa_from_env()
        _OPS.linear = torch.ops.abqllm_cpu.linear.default
        _OPS.linear_out = torch.ops.abqllm_cpu.linear.out
        _OPS.eager = _OPS.module.linear if _OPS.module is not None else _OPS.linear
        return True
    except Exception as e:  # a missing compiler or ninja, a failed compile: fall back, say why once
        log.warning("CPU kernels unavailable, using the torch path (%s: %s)", type(e).__name__, _why(e))
        return False


def _ops_registered() -> bool:
    try:
        torch.ops.abqllm_cpu.linear  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def available() -> bool:
    """Whether the extension is built and loaded (builds it on the first call)."""
    if _STATE:
        return _STATE[0]
    with _LOCK:
        ok = _loaded()
        _STATE[:] = [ok]
        return ok


_STATE: list[bool] = []  # [loaded?] once known: supports() runs on every forward, so no lock after the first


def isa() -> int:
    """The instruction set the kernels use: 1 scalar, 2 AVX2, 3 AVX-512 (ABQLLM_CPU_ISA overrides the CPU's best)."""
    _require()
    return _OPS.isa


def module():
    """The loaded extension module (its pybind11 functions: `linear`, and the native decoder of abq_cpu_decode.cpp)."""
    _require()
    if _OPS.module is None:
        raise RuntimeError("the CPU kernels were registered without their Python module; restart the process")
    return _OPS.module


def _isa_from_env() -> int:
    name = os.environ.get("ABQLLM_CPU_ISA", "auto")
    if name not in ISA:
        raise ValueError(f"ABQLLM_CPU_ISA must be one of {sorted(ISA)}, got {name!r}")
    best = int(torch.ops.abqllm_cpu.best_isa())
    if ISA[name] > best:
        log.warning("ABQLLM_CPU_ISA=%s: this CPU lacks it, using %s", name,
                    next(k for k, v in ISA.items() if v == best))
    return min(ISA[name], best) or best


def _require() -> None:
    if not available():
        raise RuntimeError("the CPU kernels are not available (see the warning logged by abqllm.kernels)")


def shape_supported(storage_bits: int, act_bits: int, group_size: int) -> bool:
    return 1 <= storage_bits <= 8 and (act_bits == 16 or 2 <= act_bits <= 8) and group_size % 32 == 0


def supports(layer, device: torch.device) -> bool:
    spec = layer.spec
    if device.type != "cpu" or not shape_supported(spec.weight.storage_bits, spec.act.bits, spec.weight.group_size):
        return False
    return available()


# sum_g s_w W_g per output row (the weight side of the activation zero-point term, see abq_cpu.h), per
# qweight tensor: N floats, rebuilt when qweight, scales or zeros are replaced or written in place. Keyed by
# id() with a weak reference that drops the entry with the tensor (a WeakTensorKeyDictionary lookup costs
# ~5 us, as much as a small layer's product).
_OFFSETS: dict[int, tuple] = {}


def row_offsets(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                storage_bits: int, group_size: int) -> torch.Tensor:
    key = (qweight._version, scales._version, zeros._version, id(scales), id(zeros))
    hit = _OFFSETS.get(id(qweight))
    if hit is not None and hit[0]() is qweight and hit[1] == key:
        return hit[2]
    _require()
    off = torch.ops.abqllm_cpu.row_offsets.default(qweight, scales, zeros, in_features, storage_bits, group_size,
                                                   isa())
    qid = id(qweight)
    _OFFSETS[qid] = (weakref.ref(qweight, lambda _, qid=qid: _OFFSETS.pop(qid, None)), key, off)
    return off


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            bias: torch.Tensor | None, act_scale: torch.Tensor | None, act_zero: torch.Tensor | None,
            in_features: int, storage_bits: int, group_size: int, act_bits: int, act_symmetric: bool,
            isa_override: int | None = None, mm_from_m: int | None = None, out: torch.Tensor | None = None,
            offsets: torch.Tensor | None = None) -> torch.Tensor:
    """y = Q_a(x) @ (s_w (w - z_w))^T + bias from the packed weights; x [..., K] -> y [..., N] in x's dtype.

    `isa_override` (1 scalar, 2 AVX2, 3 AVX-512) and `mm_from_m` replace the defaults; `out` (float32 [M, N],
    contiguous) receives the result when given (tests pass poisoned buffers); `offsets` are
    `row_offsets(...)` (computed inside the call when None).
    """
    _require()
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    args = (x2, qweight, scales, zeros, bias, act_scale, act_zero, offsets, in_features, storage_bits, group_size,
            act_bits, act_symmetric, isa() if isa_override is None else isa_override,
            MM_FROM_M if mm_from_m is None else mm_from_m)
    y = _OPS.linear_out(*args, out=out) if out is not None else _OPS.linear(*args)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], qweight.shape[0])


def act_quant(x: torch.Tensor, bits: int, symmetric: bool, act_scale: torch.Tensor | None = None,
              act_zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of x [M, K] -> (codes uint8 [M, K], scale f32 [M], zero f32 [M]), as P.act_qparams + P.quantize_act."""
    _require()
    return torch.ops.abqllm_cpu.act_quant.default(x.float(), bits, symmetric, act_scale, act_zero, isa())


def _needs_torch_path(x: torch.Tensor) -> bool:
    return x.dtype == torch.float64 or (x.requires_grad and torch.is_grad_enabled())


@register("linear", "cpu", priority=15, supports=supports)
def linear_cpu(layer, x: torch.Tensor) -> torch.Tensor:
    """Packed codes expanded in registers (AVX-512 or AVX2) or scalar code; int8 products for A2..A8, fp32 FMA for A16."""
    if _needs_torch_path(x):
        from abqllm.kernels.reference import linear_dequant
        return linear_dequant(layer, x)
    if not _STATE or not _STATE[0]:
        _require()
    # qlinear inlined, and the buffers read from the dict: a decode step makes hundreds of these calls, and
    # nn.Module.__getattr__ and the extra call cost microseconds each.
    spec, buf, k = layer.spec, layer._buffers, layer.in_features
    w, a = spec.weight, spec.act
    qweight, scales, zeros = buf["qweight"], buf["scales"], buf["zeros"]
    compiling = torch.compiler.is_compiling()  # traced: the ops (no Python cache, no pybind call)
    offsets = None
    if not a.is_float:
        offsets = (torch.ops.abqllm_cpu.row_offsets.default(qweight, scales, zeros, k, w.storage_bits, w.group_size,
                                                            _OPS.isa) if compiling else
                   row_offsets(qweight, scales, zeros, k, w.storage_bits, w.group_size))
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    fn = _OPS.linear if compiling else _OPS.eager
    y = fn(x2, qweight, scales, zeros, buf["bias"], buf.get("act_scale"), buf.get("act_zero"), offsets, k,
           w.storage_bits, w.group_size, a.bits, a.symmetric, _OPS.isa, MM_FROM_M)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], qweight.shape[0])


def _act_supports(layer, device: torch.device) -> bool:
    return device.type == "cpu" and not layer.spec.act.is_float and available()


@register("act_quant", "cpu", priority=15, supports=_act_supports)
def act_quant_cpu(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (codes uint8 [M, K], scale f32 [M], zero f32 [M]) for the layer's activation scheme."""
    return act_quant(x.reshape(-1, x.shape[-1]), layer.spec.act.bits, layer.spec.act.symmetric,
                     getattr(layer, "act_scale", None), getattr(layer, "act_zero", None))


def _register_fake() -> None:
    """Shapes for torch.compile / meta tensors, once the ops exist."""
    torch.library.register_fake("abqllm_cpu::linear")(
        lambda x, qweight, *args, **kwargs: x.new_empty(x.shape[0], qweight.shape[0]))
    torch.library.register_fake("abqllm_cpu::row_offsets")(
        lambda qweight, *args, **kwargs: qweight.new_empty(qweight.shape[0], dtype=torch.float32))
    torch.library.register_fake("abqllm_cpu::act_quant")(
        lambda x, *args, **kwargs: (x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(x.shape[0]),
                                    x.new_empty(x.shape[0])))
