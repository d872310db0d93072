"""Triton kernels against the reference engine, run by Triton's CPU interpreter.

The interpreter is chosen when triton is first imported (TRITON_INTERPRET=1), so in a normal test run
the single test `test_in_interpreter` starts this file again in a child pytest with the variable set and
asserts it passes; run it directly with TRITON_INTERPRET=1 to see the individual cases.
Every case draws fresh random inputs (never zeros) and poisons the output buffers before the kernel runs.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tests.kernels.helpers import check_close, make_layer, run_in_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


if not INTERPRETED:
    def test_in_interpreter():
        run_in_interpreter(str(Path(__file__)))

    # The interpreter accepts code that the compiler rejects (it rewrites assignments and has no constexpr
    # typing), so a few launches are also compiled for sm_90 here, without a GPU (Triton ships ptxas).
    AOT_CASES = [
        dict(m=1, n=4096, k=4096, storage_bits=3, group_size=128, act_bits=8),  # CUDA-core GEMV, straddling codes
        dict(m=1, n=4096, k=4096, storage_bits=1, group_size=0, act_bits=16),  # GEMV with one word per run
        dict(m=16, n=4096, k=11008, storage_bits=3, group_size=128, act_bits=16, x_dtype=torch.bfloat16),
        dict(m=2048, n=4096, k=4096, storage_bits=8, group_size=0, act_bits=8, has_bias=True),  # both offsets
    ]

    @pytest.mark.parametrize("case", AOT_CASES, ids=lambda c: f"M{c['m']}-W{c['storage_bits']}A{c['act_bits']}")
    def test_compiles_for_sm90(case):
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        from abqllm.kernels import triton_linear as TL

        ptx = TL.aot_compile(**case, arch=90).asm["ptx"]
        assert ("wgmma.mma_async" in ptx) == (case["m"] > 1)  # tensor cores except on the M = 1 CUDA-core path
        assert "div.full" not in ptx

    @pytest.mark.parametrize("bits,act", [(4, 16), (2, 8), (8, 8)])
    def test_gemv_compiles_for_sm90_with_vector_loads(bits, act):
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        from abqllm.kernels import triton_linear as TL

        ptx = TL.aot_compile_gemv(4096, 4096, bits, 128, act, arch=90).asm["ptx"]
        assert "ld.global.v4.b32" in ptx  # weight words arrive as 16-byte loads
        assert "cvt.rn.f32.u32" not in ptx  # codes become floats through the 2^23 mantissa, not a convert

    def test_act_quant_compiles_for_sm90():
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        from abqllm.kernels import triton_linear as TL

        ptx = TL.aot_compile_act_quant(4096, 8, symmetric=False, arch=90).asm["ptx"]
        assert "div.rn.f32" in ptx and "div.full" not in ptx  # IEEE division: codes equal the reference's

else:
    from abqllm.kernels import custom_ops, registry
    from abqllm.kernels import triton_linear as TL
    from abqllm.kernels.reference import linear_reference
    from abqllm.quant import primitives as P
    from abqllm.spec import ActSpec

    def random_x(m, k, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(m, k, generator=g) * (0.2 + 2 * torch.rand(m, 1, generator=g)) + 0.3 * torch.randn(m, 1, generator=g)
        x[:, 0] += 4.0  # an outlier column, as real activations have
        return x.to(dtype)

    def run_layer(layer, x, config=None):
        out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype)
        y = TL.qlinear(x, **TL.layer_args(layer), config=config, out=out)
        assert y.data_ptr() == out.data_ptr()
        return y

    # (weight, act, group, M, N, K, bias, act symmetric, static act, dtype)
    CASES = [
        (4, 8, 0, 1, 40, 70, True, False, False, torch.float16),
        (4, 16, 128, 3, 33, 576, False, False, False, torch.float16),  # SmolLM2 K=576, g=128: short last group
        (4, 8, 128, 17, 20, 576, True, False, False, torch.bfloat16),
        (2, 8, 64, 5, 24, 1536 // 4, False, False, False, torch.float16),
        ("2*", 8, 0, 1, 24, 100, False, False, False, torch.float16),
        ("2*", 16, 32, 4, 24, 96, True, False, False, torch.bfloat16),
        ("1*", 4, 0, 2, 16, 64, False, False, False, torch.float16),
        (1, 16, 0, 1, 16, 40, False, False, False, torch.float32),
        (1, 8, 32, 6, 18, 130, False, True, False, torch.float16),
        (3, 8, 32, 1, 30, 100, False, False, False, torch.float16),  # 3-bit codes straddle words
        (3, 4, 0, 20, 17, 99, True, False, False, torch.float32),
        (5, 6, 0, 3, 21, 75, False, False, False, torch.float16),
        (5, 16, 64, 33, 19, 128, False, False, False, torch.float16),
        (6, 5, 32, 2, 16, 96, True, True, False, torch.float16),
        (6, 16, 0, 1, 16, 64, False, False, False, torch.bfloat16),
        (7, 7, 32, 16, 24, 96, False, False, False, torch.float16),
        (7, 8, 0, 1, 20, 70, False, False, False, torch.bfloat16),
        (8, 8, 0, 1, 40, 100, True, False, False, torch.float16),  # both offsets: w - 128 and u - 128
        (8, 8, 64, 40, 33, 150, False, False, False, torch.float16),
        (8, 8, 32, 3, 16, 64, False, True, False, torch.float32),
        (8, 16, 0, 9, 16, 64, True, False, False, torch.float16),
        (8, 4, 0, 2, 16, 64, False, False, False, torch.float16),
        (4, 8, 0, 4, 16, 80, True, False, True, torch.float16),  # static per-tensor activation scale
        (2, 8, 32, 1, 16, 64, False, False, True, torch.float16),
        (4, 2, 0, 3, 16, 64, False, False, False, torch.float16),
        (4, 3, 32, 3, 16, 64, False, True, False, torch.float16),
    ]

    @pytest.mark.parametrize("case", CASES, ids=lambda c: "W{}A{}g{}-M{}N{}K{}{}{}{}-{}".format(
        *c[:6], "-bias" if c[6] else "", "-sym" if c[7] else "", "-static" if c[8] else "", str(c[9])[6:]))
    def test_qlinear_matches_reference(case):
        w, a, gs, m, n, k, bias, sym, static, dtype = case
        layer = make_layer(w, a, gs, n, k, bias=bias, sym_act=sym, static=static, seed=m * n + k)
        x = random_x(m, k, dtype, seed=m + n * k)
        ref = linear_reference(layer, x.double())
        check_close(run_layer(layer, x), ref, dtype)

    # Explicit tile configs: M = 1 with and without tl.dot, split-K with atomics, BK < group size (two tiles
    # per group), prefill-sized tiles, CUDA-core rows for M > 1.
    CONFIGS = [
        ("W4A8 M1 dot", 4, 8, 0, 1, TL.Config(bm=16, bn=16, bk=32, split_k=3, use_dot=True)),
        ("W4A16 M1 gemv", 4, 16, 64, 1, TL.Config(bm=1, bn=16, bk=64, split_k=2, use_dot=False)),
        ("W3A8 M1 gemv", 3, 8, 0, 1, TL.Config(bm=1, bn=32, bk=128, split_k=2, use_dot=False)),
        ("W7A8 M1 gemv", 7, 8, 64, 1, TL.Config(bm=1, bn=16, bk=64, split_k=1, use_dot=False)),
        ("W8A8 M2 gemv rows", 8, 8, 0, 2, TL.Config(bm=1, bn=32, bk=128, split_k=1, use_dot=False)),
        ("W3A8 M5 bk<gs", 3, 8, 128, 5, TL.Config(bm=16, bn=32, bk=64, split_k=2)),
        ("W5A16 M2 bk<gs", 5, 16, 128, 2, TL.Config(bm=16, bn=16, bk=32, split_k=2)),
        ("W2A4 M40 gemm", 2, 4, 32, 40, TL.Config(bm=32, bn=32, bk=32, group_m=2)),
        ("W6A8 M70 gemm", 6, 8, 0, 70, TL.Config(bm=64, bn=16, bk=64, group_m=1)),
    ]

    @pytest.mark.parametrize("name,w,a,gs,m,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
    def test_qlinear_configs(name, w, a, gs, m, cfg):
        n, k = (37, 320) if cfg.use_dot else (20, 200)  # the interpreter is slow on the unrolled CUDA-core path
        layer = make_layer(w, a, gs, n, k, bias=True, seed=7)
        x = random_x(m, k, torch.float16, seed=m)
        check_close(run_layer(layer, x, cfg), linear_reference(layer, x.double()), torch.float16)

    # The GEMV decode path (1/2/4/8-bit storage; `auto` takes it at M = 1): several groups per iteration,
    # split-K with atomics, short last groups, K not a multiple of 32, per-channel, rows > 1, both offsets.
    GEMV_CASES = [
        ("W4A16 g128 2 groups/iter", 4, 16, 128, 1, 40, 576, torch.float16, TL.GemvConfig(bn=16, words=32, split_k=2)),
        ("W2A8 g64 split3", 2, 8, 64, 1, 24, 384, torch.bfloat16, TL.GemvConfig(bn=8, words=16, split_k=3)),
        ("W1A4 per-channel M2", 1, 4, 0, 2, 16, 200, torch.float16, TL.GemvConfig(bn=16, words=8)),
        ("W8A8 per-channel split2", 8, 8, 0, 1, 20, 100, torch.float16, TL.GemvConfig(bn=8, words=16, split_k=2)),
        ("W8A16 g32 M3", 8, 16, 32, 3, 17, 96, torch.float32, TL.GemvConfig(bn=16, words=8)),
        ("W4A8 g32 split5", 4, 8, 32, 1, 33, 160, torch.float16, TL.GemvConfig(bn=32, words=4, split_k=5)),
        ("W2A16 per-channel", 2, 16, 0, 1, 24, 1000, torch.bfloat16, TL.GemvConfig(bn=8, words=4, split_k=4)),
    ]

    @pytest.mark.parametrize("name,w,a,gs,m,n,k,dtype,cfg", GEMV_CASES, ids=[c[0] for c in GEMV_CASES])
    def test_gemv_matches_reference(name, w, a, gs, m, n, k, dtype, cfg):
        layer = make_layer(w, a, gs, n, k, bias=m == 1, seed=n + k)
        x = random_x(m, k, dtype, seed=k)
        check_close(run_layer(layer, x, cfg), linear_reference(layer, x.double()), dtype)

    def test_gemv_refuses_odd_widths():
        layer = make_layer("2*", 8, 0, 16, 64)
        with pytest.raises(ValueError, match="GEMV path needs"):
            run_layer(layer, random_x(1, 64, torch.float16, seed=0), TL.GemvConfig())
        assert not TL.gemv_supported(3, 128) and not TL.gemv_supported(4, 96) and TL.gemv_supported(4, 128)

    @pytest.mark.parametrize("w,a", [(8, 8), (4, 16)])
    def test_per_channel_splits_stay_short(monkeypatch, w, a):
        monkeypatch.setattr(TL, "FLUSH_COLS", 64)  # int32 segments of at most 64 columns: 5 splits at K = 320
        cfg = TL.Config(bm=16, bn=16, bk=32, split_k=1)
        assert TL.split_plan(320, 0, cfg, int_path=a != 16)[0] == (5 if a != 16 else 1)
        layer = make_layer(w, a, 0, 20, 320, bias=True, seed=3)
        x = random_x(2, 320, torch.float16, seed=1)
        check_close(run_layer(layer, x, cfg), linear_reference(layer, x.double()), torch.float16)

    @pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
    @pytest.mark.parametrize("symmetric", [False, True])
    def test_act_quant_codes_are_exact(bits, symmetric):
        dtype = [torch.float16, torch.bfloat16, torch.float32][bits % 3]
        x = random_x(7, 300, dtype, seed=bits)
        x[1] = x[1].abs() + 0.1  # all positive: min clamps to 0
        x[2] = -x[2].abs() - 0.1  # all negative
        spec = ActSpec(bits, symmetric=symmetric)
        s_ref, z_ref = P.act_qparams(x, spec)
        u_ref = P.quantize_act(x, spec, s_ref, z_ref)
        out = (torch.full((7, 300), 77, dtype=torch.int8), torch.full((7,), float("nan")),
               torch.full((7,), -12345, dtype=torch.int32))
        xq, sx, ax = TL.act_quant(x, bits, symmetric, out=out)
        assert torch.equal(sx, s_ref.squeeze(-1))
        assert torch.equal(xq.float() + ax.float().unsqueeze(-1), u_ref - z_ref)
        if TL.act_center_exact(bits, symmetric):
            assert (ax == 0).all()

    def test_act_quant_rounds_half_to_even():
        # max - min = 127.5 at 8 bits gives the scale 0.5 exactly: x / s hits .5 ties.
        x = torch.tensor([[0.0, 127.5, 0.25, 0.75, 1.25, 1.75, 100.25, 3.0]])
        xq, sx, ax = TL.act_quant(x, 8, False)
        assert sx.item() == 0.5
        u = (xq.int() + ax.unsqueeze(-1)).tolist()[0]  # u - z, and z = 0 here
        assert u == [0, 255, 0, 2, 2, 4, 200, 6] and torch.equal(
            xq.float() + ax.float(), P.quantize_act(x, ActSpec(8), sx.view(1, 1), torch.zeros(1, 1)))

    def test_static_act_quant_matches_reference():
        layer = make_layer(4, 8, 0, 16, 64, static=True)
        x = random_x(5, 64, torch.float32, seed=3) * 3  # values beyond the calibrated range clamp
        xq, sx, ax = TL.act_quant(x, 8, False, layer.act_scale, layer.act_zero)
        u = P.quantize_act(x, layer.spec.act, layer.act_scale, layer.act_zero)
        assert torch.equal(xq.float() + ax.float().unsqueeze(-1), u - layer.act_zero)

    def test_auto_picks_triton_and_layer_forward_matches(caplog):
        layer = make_layer(3, 8, 32, 24, 96, bias=True, seed=11)
        assert registry.select("linear", "auto", layer, torch.device("cpu")).name == "triton"
        x = random_x(6, 96, torch.float16, seed=5).reshape(2, 3, 96)
        y = layer(x)
        assert y.shape == (2, 3, 24)
        check_close(y.reshape(6, 24), linear_reference(layer, x.reshape(6, 96).double()), torch.float16)

    def test_unsupported_group_size_falls_back():
        layer = make_layer(4, 8, 48, 16, 96)
        assert not TL.supports(layer, torch.device("cpu"))
        assert registry.select("linear", "auto", layer, torch.device("cpu")).name != "triton"

    def test_custom_op_fake_and_compile():
        layer = make_layer(4, 8, 32, 16, 64, bias=True, seed=2)
        args = TL.layer_args(layer)
        x = random_x(3, 64, torch.float16, seed=9)
        op = torch.ops.abqllm.triton_qlinear.default
        torch.library.opcheck(op, (x,), {k: v for k, v in args.items()},
                              test_utils=("test_schema", "test_faketensor"))
        fn = torch.compile(lambda t: custom_ops.triton_qlinear(t, **args), backend="aot_eager", fullgraph=True)
        check_close(fn(x), linear_reference(layer, x.double()), torch.float16)
