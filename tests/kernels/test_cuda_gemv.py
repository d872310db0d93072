"""The hand-written CUDA decode GEMV (kernels/cuda/abq_gemv.cu, kernels/cuda_gemv.py).

Without a GPU: the source compiles for sm_90 (PTX checked for the streamed 16-byte loads, dp4a and no local
memory), and the kernel's own phase functions run on the CPU through abq_gemv_emulate (the same code, blocks
one after another) against the float64 reference, in a child pytest under TRITON_INTERPRET=1 because the A8
path quantizes activations with the Triton act_quant kernel. GPU-marked cases run the real launch.
Fresh random inputs every case; outputs poisoned with NaN before the kernel runs.
"""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from abqllm.kernels import cuda as CU
from abqllm.kernels import cuda_gemv as CG
from abqllm.kernels import kpacked_linear as KL
from abqllm.kernels.reference import linear_reference
from tests.kernels import helpers
from tests.kernels.helpers import check_close

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NVCC = CU.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def make_layer(w, a, gs, n, k, *, bias=False, sym_act=False, static=False, seed=0):
    return helpers.make_layer(w, a, gs, n, k, bias=bias, sym_act=sym_act, static=static, seed=seed)


def activations(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2 + 0.3
    x[:, 0] += 300.0  # an outlier channel, as LLM activations have
    return x.half()


if not INTERPRETED:
    def test_in_interpreter():
        if NVCC is None:
            pytest.skip("nvcc not found")
        helpers.run_in_interpreter(str(Path(__file__)), "-k", "kernel")

    @needs_nvcc
    def test_ptx_streams_16_byte_loads_and_uses_dp4a(tmp_path):
        out = tmp_path / "abq_gemv.ptx"
        proc = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-ptx", str(CG.SOURCE), "-o", str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        ptx = out.read_text()
        assert "ld.global.cs.v4" in ptx  # one 16-byte, evict-first load per word row of 4 columns
        assert "dp4a.u32.s32" in ptx  # four exact products per instruction on the A8 path
        assert ".local" not in ptx  # nothing spilled to local memory

    @needs_nvcc
    def test_library_builds_and_exports():  # (the build cache itself is tested with the bit-plane library)
        lib = CG.library(None)
        for name in ("abq_gemv", "abq_gemv_emulate", "abq_gemv_shared_bytes", "abq_gemv_error_string"):
            assert hasattr(lib, name)
        # the launcher's own accounting of shared memory agrees with the plan's cap
        for m, bits, dp4a in ((1, 1, False), (4, 1, False), (2, 8, True), (4, 3, False)):
            per, _ = CG.plan(m, 8192, 4096, bits, dp4a, 132, blocks_per_sm=1)
            rows = CG.block_rows(m)
            assert lib.abq_gemv_shared_bytes(per, bits, int(dp4a), rows) == CG.shared_bytes(per, bits, dp4a, rows)
            assert CG.shared_bytes(per, bits, dp4a, rows) <= CG.SHARED_LIMIT


CASES = [
    # (weight, act, group, k, m, n, bias, sym_act, static, words_per_split[, dtype]): every width (dp4a for 1/2/4/8
    # at A <= 8, the float path otherwise), A16 and A8/A6/A4, groups and per channel, ragged K and N, one split or
    # many (the last block to arrive writes y), fp16 and bf16
    ("4", 16, 128, 512, 1, 136, True, False, False, None),
    ("2", 16, 64, 640, 1, 136, False, False, False, None),
    ("8", 16, 0, 200, 1, 136, True, False, False, None),
    ("1", 16, 128, 1024, 2, 136, False, False, False, None),
    ("4", 16, 64, 1000, 1, 136, True, False, False, 3),  # ragged last group, splits inside groups
    ("4", 8, 128, 512, 1, 136, True, False, False, None),
    ("8", 8, 0, 256, 1, 136, False, False, False, None),  # A8 asymmetric: the offset term
    ("8", 8, 0, 192, 1, 136, True, True, False, None),
    ("2", 8, 64, 1000, 1, 136, False, False, False, 8),
    ("1", 8, 0, 100, 3, 136, False, False, False, None),
    ("4", 6, 32, 160, 1, 8, True, False, False, 1),
    ("8", 8, 0, 4096, 1, 260, True, False, False, None),  # N not a multiple of the 128-column tile
    ("2", 4, 128, 4096, 1, 132, False, False, False, None),
    ("4", 8, 0, 3000, 1, 64, True, False, True, 5),  # static activation range
    ("3", 16, 128, 1000, 1, 136, True, False, False, None),  # 10 codes a word, ragged last group
    ("2*", 8, 128, 256, 1, 136, True, False, False, None),  # balanced 2-bit: 3-bit storage, integer x on floats
    ("5", 4, 32, 160, 2, 8, False, False, False, 2),
    ("6", 8, 0, 200, 1, 136, True, False, False, None),  # A8 asymmetric on the float path: xq + a
    ("7", 16, 0, 100, 1, 136, True, False, False, None),
    ("4", 16, 128, 512, 1, 136, True, False, False, None, torch.bfloat16),
    ("3", 8, 64, 640, 1, 136, True, False, False, 4, torch.bfloat16),
    ("8", 8, 0, 256, 1, 136, True, False, False, None, torch.bfloat16),
    # several activation rows a block (2, or 4 with the last block part-filled)
    ("4", 16, 128, 512, 2, 136, True, False, False, None),
    ("2", 8, 64, 640, 3, 136, False, False, False, 4),  # dp4a, a 4-row block with one row empty
    ("8", 8, 0, 256, 4, 136, True, False, False, None),  # A8 asymmetric: offsets differ per row
    ("3", 8, 128, 1000, 5, 136, True, False, False, 8),  # float path on integers, two row blocks
    ("5", 16, 32, 160, 7, 8, False, False, False, 2, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"W{c[0]}A{c[1]}g{c[2]}k{c[3]}m{c[4]}n{c[5]}")
def test_kernel_matches_reference(case):
    if not INTERPRETED:
        pytest.skip("runs in the interpreter child (test_in_interpreter)")
    w, a, gs, k, m, n, bias, sym, static, per, *dtype = case
    dtype = dtype[0] if dtype else torch.float16
    layer = make_layer(w, a, gs, n, k, bias=bias, sym_act=sym, static=static, seed=k + m)
    x = activations(m, k, seed=k).to(dtype)
    ref = linear_reference(layer, x.double())
    y = torch.full((m, n), float("nan"), dtype=dtype)
    CG.cuda_gemv(x, **KL.layer_kp_args(layer), out=y, words_per_split=per, emulate=True)
    check_close(y, ref, dtype)
    if a != 16:  # the kernel's own quantizer gives act_quant's codes: bit-identical outputs
        y2 = torch.full((m, n), float("nan"), dtype=dtype)
        CG.cuda_gemv(x, **KL.layer_kp_args(layer), out=y2, words_per_split=per, fuse_act_quant=False, emulate=True)
        assert torch.equal(y, y2)


def test_plan_covers_every_word_once_within_the_caps():
    for m, n, nw, bits, dp4a in [(1, 8192, 1024, 4, False), (1, 8192, 512, 2, True), (1, 4096, 2752, 8, True),
                                 (4, 11008, 128, 1, False), (1, 64, 100000, 8, True), (1, 4096, 416, 3, False)]:
        per, splits = CG.plan(m, n, nw, bits, dp4a, 132)
        assert (splits - 1) * per < nw <= splits * per
        assert CG.shared_bytes(per, bits, dp4a, CG.block_rows(m)) <= CG.SHARED_LIMIT
        if dp4a:
            assert -(-per // CG.WARPS) * (32 // bits) <= 32768  # int32 sums of a warp cannot overflow


@needs_nvcc
@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bias_is_added_as_stored(bias_dtype):
    """The bias almost cancels x @ W^T, so the output is small and the tolerance tight: a bias rounded on the way
    (an fp16 or fp32 bias cast to bf16 loses up to 2^-9 |b|) fails; one read as it is stored passes. (The kp_check
    dry run caught the cast at W4A4 g64 bf16: 1.25x the tolerance.)"""
    layer = make_layer("4", 16, 64, 136, 256, bias=True, seed=3)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(1, 256, generator=g) * 2 + 0.3).to(torch.bfloat16)  # no outlier: fp32 sums stay far inside
    layer.bias = None
    product = linear_reference(layer, x.double())
    layer.bias = (-product[0] + 0.1 * torch.randn(136, generator=g, dtype=torch.float64)).to(bias_dtype)
    if bias_dtype != torch.bfloat16:
        assert (layer.bias.to(torch.bfloat16).to(bias_dtype) != layer.bias).any()  # not bf16-representable
    ref = linear_reference(layer, x.double())
    y = torch.full((1, 136), float("nan"), dtype=torch.bfloat16)
    CG.cuda_gemv(x, **KL.layer_kp_args(layer), out=y, emulate=True)
    check_close(y, ref, torch.bfloat16)


def test_refuses_what_it_cannot_serve():
    args = KL.layer_kp_args(make_layer("4", 16, 64, 16, 128))
    with pytest.raises(ValueError, match="bits"):
        CG.cuda_gemv(torch.randn(1, 128).half(), **{**args, "bits": 9}, emulate=True)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        CG.cuda_gemv(torch.randn(1, 128), **args, emulate=True)
    with pytest.raises(ValueError, match="emulate"):
        CG.cuda_gemv(torch.randn(1, 128).half(), **args)
    narrow = KL.layer_kp_args(make_layer("4", 16, 64, 6, 128))
    with pytest.raises(ValueError, match="N % 4"):
        CG.cuda_gemv(torch.randn(1, 128).half(), **narrow, emulate=True)


def test_not_selected_without_gpu():
    from abqllm.kernels import registry
    layer = make_layer("4", 16, 64, 16, 128)
    assert not CG.supports(layer, torch.device("cpu"))
    assert registry.select("linear", "auto", layer, torch.device("cpu")).name != "cuda-gemv"


def test_custom_op_has_a_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import abqllm.kernels.custom_ops  # noqa: F401  (registers the ops)
    args = KL.layer_kp_args(make_layer("4", 16, 64, 16, 128))
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.abqllm.cuda_gemv(torch.empty(1, 1, 128, dtype=torch.float16), args["qweight_t"],
                                       args["scales_t"], args["zeros_t"], None, None, None, 128, 4, 64, 16, False)
        assert y.shape == (1, 1, 16)


# ---- on a GPU -------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available() or NVCC is None, reason="needs a CUDA GPU and nvcc")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("w", ["1", "2", "2*", "3", "4", "5", "6", "7", "8"])
@pytest.mark.parametrize("a", [16, 8, 4])
def test_gpu_matches_reference(w, a):
    dev = torch.device("cuda")
    for gs, k, m, n in ((128, 4096, 1, 4096), (0, 1000, 1, 300), (64, 576, 3, 132), (128, 11008, 1, 4096),
                        (128, 4096, 4, 4096)):
        layer = make_layer(w, a, gs, n, k, bias=True, seed=k)
        x = activations(m, k, seed=k)
        ref = linear_reference(layer, x.double())
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device=dev)
        CG.cuda_gemv(x.to(dev), **KL.layer_kp_args(layer.to(dev)), out=y)
        check_close(y, ref, torch.float16)
    ws, cnt = KL._WORKSPACE[dev if dev in KL._WORKSPACE else torch.device("cuda", 0)]
    assert not ws.any() and not cnt.any(), "split-K workspace not left zero"


@pytest.mark.gpu
@gpu
def test_gpu_layer_replays_in_a_graph():
    dev = torch.device("cuda")
    layer = make_layer("2", 8, 128, 4096, 4096, bias=True, seed=1)
    x = activations(1, 4096, seed=2)
    ref = linear_reference(layer, x.double())
    layer = layer.to(dev)
    layer.kernel = "cuda-gemv"
    static_x = x.to(dev)
    layer(static_x)  # warm-up: builds the library, the k-packed layout and the workspace
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = layer(static_x)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    check_close(y, ref, torch.float16)
