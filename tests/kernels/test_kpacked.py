"""The k-packed decode layout and its GEMV (kernels/kpacked.py, kpacked_linear.py, triton_kpacked.py).

Layout tests run in the normal suite. Kernel cases run in Triton's CPU interpreter: as in test_triton_linear.py,
`test_in_interpreter` starts this file again in a child pytest with TRITON_INTERPRET=1. A few launches are also
compiled for sm_90 without a GPU, and GPU-marked cases run the compiled kernel when CUDA is there.
Fresh random inputs every case; outputs poisoned with NaN before the kernel runs.
"""
import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from abqllm.kernels import kpacked as KP
from abqllm.kernels import kpacked_linear as KL
from abqllm.kernels.reference import linear_reference
from tests.kernels import helpers
from tests.kernels.helpers import check_close

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def make_layer(w: str, a: int, gs: int, n: int, k: int, *, bias=False, sym_act=False, seed=0, kernel="auto"):
    layer = helpers.make_layer(w, a, gs, n, k, bias=bias, sym_act=sym_act, seed=seed)
    layer.kernel = kernel
    return layer


# ---- the layout (no triton needed) ---------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("gs,k", [(0, 100), (32, 96), (64, 200), (128, 256), (128, 1000)])
def test_pack_round_trip(bits, gs, k):
    codes = torch.randint(0, 2 ** bits, (37, k), dtype=torch.uint8)
    packed = KP.pack_codes(codes, bits, gs)
    groups = -(-k // (gs or k))
    assert packed.shape == (groups * KP.words_per_segment(k, gs, bits), 37)
    assert torch.equal(KP.unpack_codes(packed, bits, gs, k), codes)


def test_word_holds_consecutive_codes_of_one_column():
    # 4 bits, group 64: word (g * 8 + i, n) holds columns g*64 + 8i .. g*64 + 8i + 7 of row n, code j at bits 4j
    codes = torch.randint(0, 16, (3, 128), dtype=torch.uint8)
    packed = KP.pack_codes(codes, 4, 64)
    word = int(packed[8 + 2, 1]) & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 15 for j in range(8)] == codes[1, 64 + 16:64 + 24].tolist()


def test_from_bitstream_matches_layer_codes():
    layer = make_layer("3", 16, 128, 40, 300)
    kp = KP.from_bitstream(layer.qweight, layer.scales, layer.zeros, 300, 3, 128)
    assert torch.equal(KP.unpack_codes(kp.qweight_t, 3, 128, 300), layer.codes())
    assert torch.equal(kp.scales_t, layer.scales.t()) and torch.equal(kp.zeros_t, layer.zeros.t())


@pytest.mark.parametrize("bits", range(1, 9))
def test_high_shift_keeps_every_field_inside_the_mantissa(bits):
    hs = KL.high_shift(bits)
    for j in range(KP.codes_per_word(bits)):
        end = j * bits + bits
        assert end <= 23 or (j * bits >= hs and end - hs <= 23)


def test_layout_cache_follows_the_weights():
    layer = make_layer("4", 16, 64, 16, 128)
    first = KL.layer_kpacked(layer)
    assert KL.layer_kpacked(layer) is first
    layer.qweight.add_(1)  # written in place: the cached layout is stale
    assert KL.layer_kpacked(layer) is not first
    layer.to(torch.float32)  # moved or cast: dropped
    assert layer._kernel_cache == {}


def test_split_plan_covers_every_block_once():
    for nw, bw, split_k in [(1024, 8, 0), (13, 4, 3), (7, 8, 5), (100, 8, 1)]:
        cfg = KL.KpConfig(bn=64, bw=bw, split_k=split_k)
        grid_n, split, per = KL.kp_plan(1, 200, nw, cfg, sms=4)
        blocks = -(-nw // bw)
        assert (split - 1) * per < blocks <= split * per  # no empty split, none missing


# ---- the kernel in the interpreter ---------------------------------------------------------------

if not INTERPRETED:
    def test_in_interpreter():
        helpers.run_in_interpreter(str(Path(__file__)), "-k", "kernel")

    @pytest.mark.parametrize("bits,gs,act", [(4, 128, 16), (2, 128, 8), (3, 128, 16), (8, 0, 8), (1, 64, 4)])
    def test_compiles_for_sm90(bits, gs, act):
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        ck = KL.aot_compile_kp(1, 4096, 4096, bits, gs, act, arch=90)
        ptx = ck.asm["ptx"]
        assert "ld.global.v4" in ptx  # 16-byte loads of the N-contiguous words
        # codes become floats without converts: int-to-float conversions only for zero points and activations,
        # a small fraction of the FMAs (one per code)
        converts = ptx.count("cvt.rn.f32.u32") + ptx.count("cvt.rn.f32.s32")
        assert converts * 8 <= ptx.count("fma.rn.f32")
        assert "div.s32" not in ptx and "div.u32" not in ptx  # group index by a constant: no run-time division

    @pytest.mark.parametrize("bits,gs,act,m", [(4, 128, 16, 2048), (3, 128, 8, 64), (8, 0, 8, 16)])
    def test_gemm_compiles_for_sm90_with_tensor_cores(bits, gs, act, m):
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        ptx = KL.aot_compile_kp_gemm(m, 4096, 4096, bits, gs, act, arch=90).asm["ptx"]
        if m >= 64:
            assert "wgmma.mma_async" in ptx  # Hopper's warpgroup MMA
        else:  # 16-row tiles take the warp-level MMA, and split-K meets in the workspace
            assert "mma.sync.aligned" in ptx and "atom.global" in ptx


CASES = [
    # (weight, act, group, k, m, dtype, bias, sym_act, config)
    ("4", 16, 128, 512, 1, torch.float16, False, False, None),
    ("2", 16, 64, 320, 1, torch.bfloat16, True, False, None),
    ("3", 16, 128, 1000, 2, torch.float16, False, False, None),  # 10 codes a word, ragged last group
    ("2*", 8, 128, 256, 1, torch.float16, True, False, None),
    ("8", 8, 0, 200, 1, torch.float16, False, False, None),  # A8 asymmetric: the offset term
    ("8", 8, 0, 192, 1, torch.float16, True, True, None),
    ("5", 4, 32, 160, 3, torch.float16, False, False, None),
    ("7", 16, 0, 100, 1, torch.float32, True, False, None),
    ("6", 6, 64, 384, 1, torch.float16, False, False, KL.KpConfig(bn=32, bw=2, split_k=5)),
    ("1", 16, 128, 1024, 1, torch.float16, False, False, KL.KpConfig(bn=64, bw=4, split_k=1)),
    ("4", 8, 64, 640, 4, torch.bfloat16, True, False, KL.KpConfig(bn=32, bw=8, split_k=3, num_warps=2)),
    # the next tile loaded ahead: every split's last tile re-read, ragged K and N
    ("4", 16, 64, 640, 1, torch.float16, False, False, KL.KpConfig(bn=32, bw=4, split_k=3, prefetch=True)),
    ("3", 8, 128, 1000, 2, torch.float16, True, False, KL.KpConfig(bn=64, bw=1, split_k=4, prefetch=True)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"W{c[0]}A{c[1]}g{c[2]}k{c[3]}m{c[4]}")
def test_kernel_matches_reference(case):
    if not INTERPRETED:
        pytest.skip("runs in the interpreter child (test_in_interpreter)")
    w, a, gs, k, m, dtype, bias, sym, cfg = case
    layer = make_layer(w, a, gs, 72, k, bias=bias, sym_act=sym, seed=k + m)
    x = (torch.randn(m, k) * 2 + 0.3).to(dtype)
    ref = linear_reference(layer, x.double())
    y = torch.full((m, 72), float("nan"), dtype=dtype)
    KL.kp_gemv(x, **KL.layer_kp_args(layer), config=cfg, out=y)
    check_close(y, ref, dtype)
    ws, cnt = KL._WORKSPACE.get(torch.device("cpu"), (torch.zeros(1), torch.zeros(1)))
    assert not ws.any() and not cnt.any(), "split-K workspace not left zero"


@pytest.mark.parametrize("rows", [1, 6])
def test_kernel_through_the_layer(rows):  # GEMV at one row, kp_gemm above
    if not INTERPRETED:
        pytest.skip("runs in the interpreter child (test_in_interpreter)")
    layer = make_layer("4", 16, 64, 48, 256, bias=True, kernel="triton-kpacked")
    x = torch.randn(rows, 1, 256).half()
    ref = linear_reference(layer, x.reshape(-1, 256).double()).reshape(rows, 1, 48)
    check_close(layer(x), ref, torch.float16)


GEMM_CASES = [
    # (weight, act, group, k, m, dtype, bias, sym_act)
    ("4", 16, 128, 512, 5, torch.float16, False, False),
    ("2", 16, 64, 320, 17, torch.float16, True, False),
    ("3", 16, 128, 1000, 3, torch.float16, False, False),  # one word per K step, ragged last group
    ("2*", 8, 128, 256, 4, torch.float16, True, False),
    ("8", 8, 0, 200, 2, torch.float16, False, False),  # A8 asymmetric: u - z_x up to 255
    ("8", 8, 0, 192, 3, torch.float16, True, True),
    ("5", 4, 32, 160, 3, torch.float16, False, False),
    ("7", 16, 0, 100, 2, torch.float32, True, False),
    ("6", 6, 64, 384, 2, torch.bfloat16, False, False),
    ("1", 16, 128, 1024, 2, torch.bfloat16, False, False),
    ("4", 8, 64, 640, 20, torch.float16, True, False),
    # split-K (decode batches): explicit splits, ragged last split, per channel, bias added once
    ("4", 16, 128, 1024, 4, torch.float16, True, False, KL.KpGemmConfig(bm=16, bn=32, num_stages=1, split_k=3)),
    ("3", 8, 0, 1000, 2, torch.float16, True, False, KL.KpGemmConfig(bm=16, bn=64, num_stages=1, split_k=5)),
    ("2", 16, 64, 640, 17, torch.bfloat16, False, False, KL.KpGemmConfig(bm=16, bn=32, num_stages=1, split_k=1)),
]


def test_gemm_split_plan_covers_every_step_once():
    for nw, bkw, tiles_n, split_k in [(1024, 8, 64, 0), (1024, 8, 200, 0), (13, 1, 1, 0), (7, 2, 2, 5), (100, 8, 1, 1)]:
        cfg = KL.KpGemmConfig(bm=16, bn=128, split_k=split_k)
        tiles, split, per = KL.kp_gemm_plan(16, 128 * tiles_n, nw, bkw, cfg, sms=132)
        steps = -(-nw // bkw)
        assert tiles == tiles_n and (split - 1) * per < steps <= split * per  # no empty split, none missing
        if not split_k:
            assert split == 1 if tiles >= 132 else split > 1 or steps < 2 * KL.GEMM_MIN_STEPS
            assert split == 1 or per >= KL.GEMM_MIN_STEPS


@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: f"W{c[0]}A{c[1]}g{c[2]}k{c[3]}m{c[4]}")
def test_gemm_kernel_matches_reference(case):
    if not INTERPRETED:
        pytest.skip("runs in the interpreter child (test_in_interpreter)")
    w, a, gs, k, m, dtype, bias, sym, *cfg = case
    layer = make_layer(w, a, gs, 72, k, bias=bias, sym_act=sym, seed=k + m)
    x = (torch.randn(m, k) * 2 + 0.3).to(dtype)
    ref = linear_reference(layer, x.double())
    y = torch.full((m, 72), float("nan"), dtype=dtype)
    KL.kp_gemm(x, **KL.layer_kp_args(layer), config=cfg[0] if cfg else None, out=y)
    check_close(y, ref, dtype)
    ws, cnt = KL._WORKSPACE.get(torch.device("cpu"), (torch.zeros(1), torch.zeros(1)))
    assert not ws.any() and not cnt.any(), "split-K workspace not left zero"


# ---- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("w", ["1", "2", "2*", "3", "4", "5", "6", "7", "8"])
@pytest.mark.parametrize("a", [16, 8, 4])
def test_gpu_kernel_matches_reference(w, a):
    dev = torch.device("cuda")
    for gs, k, m in ((128, 4096, 1), (0, 1000, 1), (64, 576, 3), (128, 4096, 64)):
        layer = make_layer(w, a, gs, 300, k, bias=True, seed=k)
        x = (torch.randn(m, k) * 2 + 0.3).half()
        ref = linear_reference(layer, x.double())
        layer = layer.to(dev)
        for fn in (KL.kp_gemv, KL.kp_gemm):
            y = torch.full((m, 300), float("nan"), dtype=torch.float16, device=dev)
            fn(x.to(dev), **KL.layer_kp_args(layer), out=y)
            check_close(y, ref, torch.float16)
    ws, cnt = KL._WORKSPACE[y.device]
    assert not ws.any() and not cnt.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_takes_the_gemv_and_replays_in_a_graph():
    dev = torch.device("cuda")
    layer = make_layer("4", 16, 128, 4096, 4096, seed=1).to(dev)
    x = torch.randn(1, 4096, device=dev, dtype=torch.float16)
    ref = linear_reference(layer.cpu(), x.cpu().double())
    layer = layer.to(dev)
    y = layer(x)  # warm-up: builds the k-packed layout and the workspace
    assert "kpacked" in layer._kernel_cache
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = layer(x)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    check_close(y, ref, torch.float16)


def test_keep_only_kpacked_leaves_cpu_layers_alone():
    model = torch.nn.Sequential(make_layer("4", 16, 64, 16, 128), make_layer("2", 8, 128, 8, 256))
    before = [m.qweight for m in model]
    assert KL.keep_only_kpacked(model) == 0
    assert all(m.qweight is q and m.kernel == "auto" and m._kernel_cache == {} for m, q in zip(model, before))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_keep_only_kpacked_serves_every_m_and_still_saves():
    dev = torch.device("cuda")
    cpu_layer = make_layer("4", 8, 128, 512, 1024, bias=True, seed=3)
    state = {k: v.clone() for k, v in cpu_layer.state_dict().items()}
    layer = torch.nn.Sequential(copy.deepcopy(cpu_layer).to(dev))
    freed = KL.keep_only_kpacked(layer)
    assert freed == state["qweight"].numel() * 4 and not layer[0].qweight.is_cuda
    from tests.kernels.test_dense_prefill import magnitude
    from abqllm.kernels import dense_prefill
    dense = dense_prefill.DENSE_MIN_M is not None
    for m in (1, 5, 300):  # the GEMV, kp_gemm, and kp_gemm or the dense path (W4A8 g128: fp16 fake-quant)
        x = torch.randn(m, 1024).half()
        helpers.check_close_rounded(layer(x.to(dev)), linear_reference(cpu_layer, x.double()), torch.float16,
                                    magnitude(cpu_layer, x.double()) if dense and m >= 256 else torch.zeros(m, 512))
    assert all(torch.equal(v.cpu(), state[k]) for k, v in layer[0].state_dict().items())


@pytest.mark.parametrize("fn", [KL.kp_gemv, KL.kp_gemm])
def test_launchers_refuse_mismatched_inputs(fn):
    args = KL.layer_kp_args(make_layer("4", 16, 64, 16, 128))
    with pytest.raises(ValueError, match="features"):
        fn(torch.randn(1, 100), **args)
    with pytest.raises(ValueError, match="word rows"):
        fn(torch.randn(1, 128), **{**args, "qweight_t": args["qweight_t"][:-1]})
    with pytest.raises(ValueError, match="bits"):
        fn(torch.randn(1, 128), **{**args, "bits": 9})


def test_custom_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import abqllm.kernels.custom_ops  # noqa: F401  (registers the ops)
    args = KL.layer_kp_args(make_layer("4", 16, 64, 16, 128))
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 3, 128)
        for op in (torch.ops.abqllm.kp_gemv, torch.ops.abqllm.kp_gemm):
            y = op(x, args["qweight_t"], args["scales_t"], args["zeros_t"], None, None, None, 128, 4, 64, 16, False)
            assert y.shape == (2, 3, 16)
