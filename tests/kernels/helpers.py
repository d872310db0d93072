"""Shared by the kernel tests: a QuantLinear quantized on the CPU from random weights, the output tolerance
check, and re-running a test file in a child pytest under Triton's interpreter."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abqllm.nn import QuantLinear
from abqllm.spec import ActSpec, LayerSpec, WeightSpec

REPO = Path(__file__).resolve().parents[2]
TOL = {torch.float16: (2.0 ** -10, 1e-4), torch.bfloat16: (2.0 ** -7, 1e-3), torch.float32: (2e-6, 2e-6)}


def make_layer(w, a, gs, n, k, *, bias=False, sym_act=False, static=False, seed=0):
    """W`w`A`a` (w like 4, "4" or "2*" for balanced), group `gs`, quantized on the CPU; `static`: a fixed
    activation range (-3, 4) instead of per-token ranges."""
    w = str(w)
    spec = LayerSpec(WeightSpec(int(w.rstrip("*")), balanced=w.endswith("*"), group_size=gs),
                     ActSpec(a, symmetric=sym_act, dynamic=not static))
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g)))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_float(lin, spec, act_range=(-3.0, 4.0) if static else None)


def check_close(y, ref, dtype):
    rtol, atol = TOL[dtype]
    y = y.cpu()
    assert y.dtype == dtype and torch.isfinite(y).all(), "NaN/inf in the output: an element was not written"
    err = (y.double() - ref).abs()
    bound = rtol * ref.abs() + atol * ref.abs().max()
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, worst ratio {(err / bound).max().item():.2f}"


def interpreter_broken() -> str | None:
    """Triton <= 3.6's interpreter turns 1-element arrays into Python ints, which numpy >= 2.4 refuses."""
    import numpy
    from importlib.metadata import version

    def ver(s):
        return tuple(int(p) for p in s.split(".")[:2] if p.isdigit())

    if ver(version("triton")) < (3, 7) and ver(numpy.__version__) >= (2, 4):
        return f"triton {version('triton')} interpreter fails with numpy {numpy.__version__} (triton issue 9171): use triton>=3.7"
    return None


def run_in_interpreter(test_file: str, *pytest_args: str) -> None:
    """Run `test_file` in a child pytest with TRITON_INTERPRET=1 (it must be set before triton is imported)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if (why := interpreter_broken()):
        pytest.skip(why)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, *pytest_args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# Unit roundoff of each float dtype: the dense prefill path rounds W_hat (and fake-quantized activations) to it.
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}


def check_close_rounded(y, ref, dtype, magnitude):
    """check_close, plus the error a dot of K operands rounded to `dtype` may carry: 2u * sum_k |x_k| |w_k|
    (`magnitude` = |x| @ |W|^T in float64). For kernels that multiply a dequantized weight in x's dtype."""
    rtol, atol = TOL[dtype]
    y = y.cpu()
    assert y.dtype == dtype and torch.isfinite(y).all(), "NaN/inf in the output: an element was not written"
    err = (y.double() - ref).abs()
    bound = rtol * ref.abs() + atol * ref.abs().max() + 2 * UNIT[dtype] * magnitude
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, worst ratio {(err / bound).max().item():.2f}"
