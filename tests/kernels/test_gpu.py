"""Fast kernels on a real GPU against the reference engine (skipped without CUDA).

Reference results are computed on the CPU in float64 from the same packed buffers; outputs are poisoned
(NaN) before each kernel run; inputs are fresh random values. Also: CUDA-graph capture and replay,
torch.compile over the custom ops, a layer quantized on the CPU running unchanged on the GPU.
Run: python -m pytest -m gpu tests/kernels/test_gpu.py
"""
import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from abqllm.kernels import cuda as CU  # noqa: E402
from abqllm.kernels import registry  # noqa: E402
from abqllm.kernels import triton_linear as TL  # noqa: E402
from abqllm.kernels.reference import linear_reference  # noqa: E402
from abqllm.quant import primitives as P  # noqa: E402
from abqllm.spec import ActSpec  # noqa: E402
from tests.kernels.helpers import check_close, make_layer  # noqa: E402

DEV = torch.device("cuda")
WEIGHTS = ["1", "2", "2*", "3", "4", "5", "6", "7", "8"]


def random_x(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (0.2 + 2 * torch.rand(m, 1, generator=g))
    x[:, 0] += 4.0
    return x.to(dtype)


# Every weight width x activation width at decode (M = 1, groups of 128) and prefill (M = 33, per-channel),
# plus the other decode/prefill shapes for a few widths: each new combination costs a Triton compile.
TRITON_CASES = ([(w, a, 1, 128) for w in WEIGHTS for a in (16, 8, 4)] + [(w, a, 33, 0) for w in WEIGHTS for a in (16, 8, 4)]
                + [(w, a, m, gs) for w in ("2*", "4", "8") for a in (16, 8) for m, gs in ((5, 0), (16, 128), (300, 128))])


@pytest.mark.parametrize("w,a,m,gs", TRITON_CASES)
def test_triton_matches_reference(w, a, m, gs):
    n, k = 200, 576  # SmolLM2's K: with g128 the last group is 64 columns
    dtype = torch.bfloat16 if m == 5 else torch.float16
    layer = make_layer(w, a, gs, n, k, bias=m == 33, sym_act=m == 16, seed=m + k)
    x = random_x(m, k, dtype, seed=m * 7 + a)
    ref = linear_reference(layer, x.double())
    lg = copy.deepcopy(layer).to(DEV)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    y = TL.qlinear(x.to(DEV), **TL.layer_args(lg), out=out)
    torch.cuda.synchronize()
    check_close(y, ref, dtype)


@pytest.mark.parametrize("cfg", [TL.Config(bm=1, bn=64, bk=128, split_k=4, use_dot=False),
                                 TL.Config(bm=1, bn=128, bk=256, split_k=8, use_dot=False, num_warps=8),
                                 TL.Config(bm=16, bn=64, bk=128, split_k=4),
                                 TL.Config(bm=16, bn=128, bk=64, split_k=1, num_warps=8),
                                 TL.Config(bm=64, bn=128, bk=128, num_warps=8, num_stages=3),
                                 TL.Config(bm=128, bn=128, bk=64, num_warps=8, num_stages=4)],
                         ids=lambda c: f"bm{c.bm}bn{c.bn}bk{c.bk}s{c.split_k}{'dot' if c.use_dot else 'cuda-core'}")
@pytest.mark.parametrize("w,a", [("3", 8), ("4", 16), ("8", 8), ("2*", 4)])
def test_triton_configs(cfg, w, a):
    m = 1 if cfg.bm == 1 else 12 if cfg.bm == 16 else 150
    layer = make_layer(w, a, 128, 384, 1536, bias=True, seed=3)
    x = random_x(m, 1536, torch.float16, seed=m)
    ref = linear_reference(layer, x.double())
    lg = copy.deepcopy(layer).to(DEV)
    out = torch.full((m, 384), float("nan"), dtype=torch.float16, device=DEV)
    check_close(TL.qlinear(x.to(DEV), **TL.layer_args(lg), config=cfg, out=out), ref, torch.float16)


@pytest.mark.parametrize("bits", [2, 4, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_act_quant_codes_exact_on_gpu(bits, symmetric):
    x = random_x(33, 4096, torch.float16, seed=bits)
    spec = ActSpec(bits, symmetric=symmetric)
    s_ref, z_ref = P.act_qparams(x, spec)
    u_ref = P.quantize_act(x, spec, s_ref, z_ref)
    xq, sx, ax = TL.act_quant(x.to(DEV), bits, symmetric)
    assert torch.equal(sx.cpu(), s_ref.squeeze(-1))
    assert torch.equal(xq.cpu().float() + ax.cpu().float().unsqueeze(-1), u_ref - z_ref)


needs_bmma = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8
                                or CU.find_nvcc() is None, reason="needs sm_80+ and nvcc")


@needs_bmma
@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("a", [8, 4, 2])
@pytest.mark.parametrize("m,gs", [(1, 0), (3, 128), (16, 32), (40, 0)])
def test_cuda_bmma_matches_reference(w, a, m, gs):
    n, k = 120, 576
    layer = make_layer(w, a, gs, n, k, bias=m == 3, sym_act=m == 16, seed=m)
    x = random_x(m, k, torch.float16, seed=m + a)
    ref = linear_reference(layer, x.double())
    lg = copy.deepcopy(layer).to(DEV)
    y = CU.qlinear(x.to(DEV), **TL.layer_args(lg))
    torch.cuda.synchronize()
    check_close(y, ref, torch.float16)


@needs_bmma
def test_cuda_pack_kernels_match_reference_layouts():
    from abqllm.formats.packing import pack_bitplanes
    layer = make_layer("3", 8, 128, 64, 576, seed=1)
    codes = layer.codes()
    lg = copy.deepcopy(layer).to(DEV)
    planes, sums = CU.repack_bitplanes(lg.qweight, 576, 3, 128)
    assert torch.equal(planes.cpu(), pack_bitplanes(codes, 3))
    assert torch.equal(sums.cpu(), torch.nn.functional.pad(codes.int(), (0, 64)).reshape(64, 5, 128).sum(-1).int())
    x = random_x(4, 576, torch.float16, seed=2)
    xp, xs, sx, zx = CU.act_quant_pack(x.to(DEV), 8, False, 128)
    s_ref, z_ref = P.act_qparams(x, ActSpec(8))
    u = P.quantize_act(x, ActSpec(8), s_ref, z_ref).to(torch.uint8)
    assert torch.equal(xp.cpu(), pack_bitplanes(u, 8)) and torch.equal(sx.cpu(), s_ref.squeeze(-1))


@pytest.mark.parametrize("kernel", ["triton", "cuda"])
def test_cuda_graph_capture_and_replay(kernel):
    if kernel == "cuda" and (torch.cuda.get_device_capability()[0] < 8 or CU.find_nvcc() is None):
        pytest.skip("needs sm_80+ and nvcc")
    layer = make_layer("4", 8, 128, 512, 1024, bias=True, seed=5).to(DEV)
    layer.kernel = kernel
    x = random_x(4, 1024, torch.float16, seed=1).to(DEV)
    eager = layer(x)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(static_x)  # warm-up outside the graph (compiles, builds caches)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    x2 = random_x(4, 1024, torch.float16, seed=2).to(DEV)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    # split-K sums partials with float atomics in any order: compare with the tolerance, not bit for bit
    check_close(static_y, layer(x2).double().cpu(), torch.float16)
    assert not torch.allclose(static_y, eager)


def test_torch_compile_over_custom_op():
    layer = make_layer("2*", 8, 128, 256, 1024, seed=6).to(DEV)
    x = random_x(3, 1024, torch.float16, seed=4).to(DEV)
    fn = torch.compile(lambda t: layer(t), fullgraph=False)
    check_close(fn(x), linear_reference(copy.deepcopy(layer).cpu(), x.cpu().double()), torch.float16)


def test_cpu_quantized_layer_runs_on_gpu_with_auto():
    layer = make_layer("3", 8, 64, 128, 576, bias=True, seed=8)
    x = random_x(2, 576, torch.float16, seed=8)
    ref = linear_reference(layer, x.double())
    lg = layer.to(DEV)
    assert registry.select("linear", "auto", lg, DEV).name == "triton"
    check_close(lg(x.to(DEV)), ref, torch.float16)


# The GEMV decode path with the tile shapes the GPU suite sweeps (split-K, several groups per iteration).
GEMV_CONFIGS = [TL.GemvConfig(), TL.GemvConfig(bn=16, words=64, split_k=3), TL.GemvConfig(bn=64, words=16, num_warps=8),
                TL.GemvConfig(bn=8, words=32, num_warps=2, split_k=1)]


@pytest.mark.parametrize("cfg", GEMV_CONFIGS, ids=lambda c: f"bn{c.bn}w{c.words}s{c.split_k}nw{c.num_warps}")
@pytest.mark.parametrize("w,a,gs,k", [("4", 16, 128, 4096), ("2", 8, 64, 576), ("8", 8, 0, 1000), ("1", 4, 128, 2048),
                                      ("4", 8, 0, 4096)])
def test_gemv_matches_reference(cfg, w, a, gs, k):
    layer = make_layer(w, a, gs, 300, k, bias=True, seed=k)
    x = random_x(1, k, torch.float16, seed=1)
    ref = linear_reference(layer, x.double())
    lg = copy.deepcopy(layer).to(DEV)
    out = torch.full((1, 300), float("nan"), dtype=torch.float16, device=DEV)
    check_close(TL.qlinear(x.to(DEV), **TL.layer_args(lg), config=cfg, out=out), ref, torch.float16)


def test_online_hadamard_layer_on_gpu_matches_the_cpu_and_captures():
    """A +had layer (input rotated by QuantLinear.forward before the kernel) on the GPU: same result as on
    the CPU, and the rotation (its cached matrix included) replays inside a CUDA graph."""
    import dataclasses
    layer = make_layer("4", 8, 0, 256, 1536, seed=9)
    layer.spec = dataclasses.replace(layer.spec, hadamard=512)
    x = random_x(2, 1536, torch.float16, seed=9)
    from abqllm.quant.hadamard import rotate_last_dim
    # the reference gets the input rotated as forward rotates it on the GPU (fp16), so 8-bit codes agree
    ref = linear_reference(layer, rotate_last_dim(x.to(DEV), 512).cpu().double())
    assert (rotate_last_dim(x.to(DEV), 512).cpu().double() - rotate_last_dim(x.double(), 512)).abs().max() < 1e-2
    lg = copy.deepcopy(layer).to(DEV)
    check_close(lg(x.to(DEV)), ref, torch.float16)
    static_x = x.to(DEV).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lg(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = lg(static_x)
    graph.replay()
    torch.cuda.synchronize()
    check_close(static_y, ref, torch.float16)
