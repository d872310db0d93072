"""The dense prefill path (kernels/dense_prefill.py, triton_dense.py): k-packed weights expanded for cuBLAS.

Kernel cases run in Triton's CPU interpreter (`test_in_interpreter` starts this file again in a child pytest with
TRITON_INTERPRET=1), the kernels are compiled for sm_90 without a GPU, and GPU-marked cases run when CUDA is
there. Fresh random inputs every case; outputs poisoned with NaN before the kernels run.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from abqllm.kernels import dense_prefill as D
from abqllm.kernels import kpacked_linear as KL
from abqllm.kernels.reference import linear_reference
from abqllm.quant import primitives as P
from tests.kernels import helpers
from tests.kernels.helpers import check_close, check_close_rounded

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def make_layer(w, a, gs, n, k, *, bias=False, sym_act=False, static=False, seed=0, kernel="auto"):
    layer = helpers.make_layer(w, a, gs, n, k, bias=bias, sym_act=sym_act, static=static, seed=seed)
    layer.kernel = kernel
    return layer


def magnitude(layer, x):
    """|x_hat| @ |W_hat|^T: the scale of the rounding error of a product in x's dtype."""
    x2 = x.reshape(-1, layer.in_features).double()
    if not layer.spec.act.is_float:
        sx, zx = layer.act_qparams(x2)
        x2 = P.fake_quant_act(x2, layer.spec.act, sx, zx)
    return x2.abs() @ layer.dequantized_weight(torch.float64).abs().T


if not INTERPRETED:
    def test_in_interpreter():
        helpers.run_in_interpreter(str(Path(__file__)), "-k", "kernel")

    @pytest.mark.parametrize("bits,gs,dtype,col_sums", [(4, 128, torch.float16, False), (3, 64, torch.bfloat16, False),
                                                        (8, 0, torch.int8, True), (2, 0, torch.int8, False)])
    def test_expand_compiles_for_sm90(bits, gs, dtype, col_sums):
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        ptx = D.aot_compile_expand(4096, 4096, bits, gs, dtype, col_sums).asm["ptx"]
        assert "ld.global" in ptx and "st.global" in ptx and "ld.local" not in ptx  # no register spills
        assert ("atom.global" in ptx) == col_sums

    @pytest.mark.parametrize("center_w,a_offset,has_bias", [(True, True, True), (False, False, False)])
    def test_epilogue_compiles_for_sm90(center_w, a_offset, has_bias):
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        ptx = D.aot_compile_int_epilogue(center_w, a_offset, has_bias).asm["ptx"]
        assert "st.global" in ptx and "ld.local" not in ptx


# ---- in the interpreter ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("gs,k", [(0, 100), (32, 96), (64, 200), (128, 1000)])
def test_kernel_expands_to_the_dequantized_weight(bits, gs, k):
    if not INTERPRETED:
        pytest.skip("runs in the interpreter child (test_in_interpreter)")
    layer = make_layer(bits, 16, gs, 40, k, seed=bits * k)
    kp = KL.layer_kpacked(layer)
    out = torch.full((k, 40), float("nan"))
    w, cs = D.expand_kpacked(kp.qweight_t, kp.scales_t, kp.zeros_t, k, bits, gs, torch.float32, out=out)
    assert w is out and cs is None
    torch.testing.assert_close(w.t(), layer.dequantized_weight(torch.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_kernel_expands_int8_codes_and_their_column_sums(bits):
    if not INTERPRETED:
        pytest.skip("runs in the interpreter child (test_in_interpreter)")
    k = 200
    layer = make_layer(bits, 8, 0, 40, k, seed=bits)
    kp = KL.layer_kpacked(layer)
    out = torch.full((k, 40), -77, dtype=torch.int8)
    w8, cs = D.expand_kpacked(kp.qweight_t, kp.scales_t, kp.zeros_t, k, bits, 0, torch.int8, col_sums=True, out=out)
    center = 128 if bits == 8 else layer.zeros.reshape(1, -1).int()
    want = layer.codes().int().t() - center
    assert torch.equal(w8.int(), want) and torch.equal(cs, want.sum(0, dtype=torch.int32))


CASES = [
    # (weight, act, group, k, m, dtype, bias, sym_act, static): M > 16 with K, N multiples of 8 takes _int_mm
    # where the weights are per channel; the rest the float GEMM
    ("4", 16, 128, 512, 20, torch.float16, True, False, False),
    ("3", 16, 64, 1000, 5, torch.float32, False, False, False),  # ragged last group
    ("2", 16, 0, 320, 17, torch.bfloat16, True, False, False),
    ("8", 8, 0, 256, 24, torch.float16, True, False, False),  # int8 GEMM: 128 - z and the activation offset
    ("8", 8, 0, 192, 24, torch.float16, False, True, False),  # symmetric: no offset term
    ("4", 8, 0, 200, 24, torch.float16, False, False, False),  # u - z exact in int8
    ("3", 8, 0, 256, 24, torch.bfloat16, True, True, False),
    ("7", 6, 0, 264, 30, torch.float16, True, False, False),
    ("4", 8, 0, 256, 40, torch.float16, True, False, True),  # static per-tensor activation range
    ("2*", 8, 128, 256, 24, torch.float16, True, False, False),  # grouped A8: fake-quantized activations
    ("5", 4, 32, 160, 3, torch.float16, False, False, False),
    ("8", 8, 0, 100, 24, torch.float16, False, False, False),  # K not a multiple of 8: no _int_mm
    ("1", 16, 0, 100, 4, torch.float16, False, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"W{c[0]}A{c[1]}g{c[2]}k{c[3]}m{c[4]}")
def test_kernel_matches_reference(case):
    if not INTERPRETED:
        pytest.skip("runs in the interpreter child (test_in_interpreter)")
    w, a, gs, k, m, dtype, bias, sym, static = case
    n = 72
    layer = make_layer(w, a, gs, n, k, bias=bias, sym_act=sym, static=static, seed=k + m)
    x = (torch.randn(m, k) * 2 + 0.3).to(dtype)
    ref = linear_reference(layer, x.double())
    y = torch.full((m, n), float("nan"), dtype=dtype)
    D.dense_qlinear(x, **KL.layer_kp_args(layer), out=y)
    if a != 16 and not gs and D.int_mm_ok(m, n, k):
        check_close(y, ref, dtype)  # integer GEMM: exact up to the last rounding
    else:
        check_close_rounded(y, ref, dtype, magnitude(layer, x.double()))


@pytest.mark.parametrize("rows", [1, 20])
def test_kernel_through_the_layer(rows):
    if not INTERPRETED:
        pytest.skip("runs in the interpreter child (test_in_interpreter)")
    layer = make_layer("8", 8, 0, 48, 256, bias=True, kernel="triton-dense")
    x = torch.randn(rows, 1, 256).half()
    ref = linear_reference(layer, x.reshape(-1, 256).double()).reshape(rows, 1, 48)
    check_close_rounded(layer(x), ref, torch.float16, magnitude(layer, x).reshape(rows, 1, 48))


# ---- no triton needed ------------------------------------------------------------------------------

def test_int8_expansion_refuses_groups():
    kp = KL.layer_kpacked(make_layer("4", 8, 64, 16, 128))
    with pytest.raises(ValueError, match="per-channel"):
        D.expand_kpacked(kp.qweight_t, kp.scales_t, kp.zeros_t, 128, 4, 64, torch.int8)


def test_int_mm_shape_rules():
    assert D.int_mm_ok(17, 64, 64) and not D.int_mm_ok(16, 64, 64)
    assert not D.int_mm_ok(32, 60, 64) and not D.int_mm_ok(32, 64, 60) and not D.int_mm_ok(32, 64, 1 << 18)


def test_launcher_refuses_mismatched_inputs():
    args = KL.layer_kp_args(make_layer("4", 16, 64, 16, 128))
    with pytest.raises(ValueError, match="features"):
        D.dense_qlinear(torch.randn(1, 100), **args)
    with pytest.raises(ValueError, match="word rows"):
        D.dense_qlinear(torch.randn(1, 128), **{**args, "qweight_t": args["qweight_t"][:-1]})


def test_custom_op_has_a_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import abqllm.kernels.custom_ops  # noqa: F401  (registers the ops)
    args = KL.layer_kp_args(make_layer("4", 16, 64, 16, 128))
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.abqllm.dense_qlinear(torch.empty(2, 300, 128), args["qweight_t"], args["scales_t"],
                                           args["zeros_t"], None, None, None, 128, 4, 64, 16, False)
        assert y.shape == (2, 300, 16)


def test_auto_takes_the_dense_path_only_for_cuda_prefill(monkeypatch):
    monkeypatch.setattr(D, "DENSE_MIN_M", D.PLANNED_MIN_M)
    assert not D.use_dense(torch.empty(D.DENSE_MIN_M, 8))  # CPU tensors never
    assert D.PLANNED_MIN_M > KL.KP_MAX_M


# ---- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("w", ["1", "2", "2*", "3", "4", "5", "6", "7", "8"])
@pytest.mark.parametrize("a", [16, 8, 4])
def test_gpu_dense_matches_reference(w, a):
    dev = torch.device("cuda")
    for gs, k, m in ((128, 4096, 300), (0, 1000, 64), (0, 4096, 257), (64, 576, 3)):
        layer = make_layer(w, a, gs, 296, k, bias=True, seed=k)
        x = (torch.randn(m, k) * 2 + 0.3).half()
        ref, mag = linear_reference(layer, x.double()), magnitude(layer, x.double())
        y = torch.full((m, 296), float("nan"), dtype=torch.float16, device=dev)
        D.dense_qlinear(x.to(dev), **KL.layer_kp_args(layer.to(dev)), out=y)
        if a != 16 and not gs and D.int_mm_ok(m, 296, k):
            check_close(y, ref, torch.float16)  # torch._int_mm and the integer epilogue: exact sums
        else:
            check_close_rounded(y, ref, torch.float16, mag)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_prefill_takes_the_dense_path(monkeypatch):
    monkeypatch.setattr(D, "DENSE_MIN_M", D.PLANNED_MIN_M)
    dev = torch.device("cuda")
    layer = make_layer("4", 8, 0, 512, 1024, bias=True, seed=5).to(dev)
    x = torch.randn(D.DENSE_MIN_M, 1024, device=dev, dtype=torch.float16)
    assert D.use_dense(x)
    assert torch.equal(layer(x), D.dense_qlinear(x, **KL.layer_kp_args(layer)))
