"""The CPU kernels (abqllm/kernels/cpu) against the reference engine, on fresh random inputs.

Every case runs each instruction set the machine has (scalar always, AVX2 and AVX-512 where the CPU has them)
into an output buffer poisoned with NaN; `test_isa_matches_reference` names each level, and skips the ones the
CPU lacks with that reason. Tolerances (|y - ref| <= rtol |ref| + atol max|ref|, fp32 outputs):
  integer path (A2..A8): products are exact int32, so only the fp32 epilogue rounds: (2e-6, 4e-6)
  float path (A16): fp32 FMA sums; the AVX2 small-M kernel also moves the zero point out of the loop
  (sum s_w z_w sum(x) once per group), which costs ~1-2 bits: (1e-5, 2e-5)
Exactness is checked separately: with unit scales and integer activations every path is exact.
"""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abqllm.kernels import cpu, registry
from abqllm.kernels.reference import linear_dequant, linear_reference
from abqllm.nn import QuantLinear
from abqllm.quant import primitives as P
from abqllm.spec import ActSpec, LayerSpec, WeightSpec

REPO = Path(__file__).resolve().parents[2]
TOL = {"int": (2e-6, 4e-6), "float": (1e-5, 2e-5)}


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu.available():
        pytest.skip("the CPU extension could not be built here (see the logged warning)")


ISA_NAMES = {1: "scalar", 2: "avx2", 3: "avx512"}


def best_isa() -> int:
    return int(torch.ops.abqllm_cpu.best_isa())


def isas() -> list[int]:
    """Every level this CPU runs: scalar, then AVX2, then AVX-512."""
    return list(range(1, best_isa() + 1))


def make_layer(wbits, balanced, group, abits, n, k, *, bias=False, sym_act=False, static=False, seed=0):
    spec = LayerSpec(WeightSpec(wbits, balanced=balanced, group_size=group),
                     ActSpec(abits, symmetric=sym_act, dynamic=not static))
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1 + 0.01)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_float(lin, spec, act_range=(-2.5, 3.5) if static else None)


def random_x(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * 2 + 0.3


def run(layer, x, isa, mm_from_m=None, offsets=None):
    """The op into a NaN-poisoned buffer."""
    spec = layer.spec
    out = torch.full((x.shape[0], layer.out_features), float("nan"))
    y = cpu.qlinear(x, layer.qweight, layer.scales, layer.zeros, layer.bias, getattr(layer, "act_scale", None),
                    getattr(layer, "act_zero", None), layer.in_features, spec.weight.storage_bits,
                    spec.weight.group_size, spec.act.bits, spec.act.symmetric, isa_override=isa,
                    mm_from_m=mm_from_m, out=out, offsets=offsets)
    assert y.data_ptr() == out.data_ptr()
    return y


def check_close(y, ref, path, what=""):
    rtol, atol = TOL[path]
    assert not torch.isnan(y).any(), f"{what}: NaN left in the output"
    err = (y.double() - ref).abs()
    bound = rtol * ref.abs() + atol * ref.abs().max()
    assert (err <= bound).all(), f"{what}: max err {err.max().item():.3g}, max |ref| {ref.abs().max().item():.3g}"


WEIGHTS = [(b, False) for b in range(1, 9)] + [(b, True) for b in (1, 2, 3, 5, 7)]
SHAPES = [(33, 576), (7, 70), (5, 33)]  # (N, K): K % 32 != 0 and K % group != 0 included


@pytest.mark.parametrize("group", [0, 32, 64, 128])
@pytest.mark.parametrize("abits", [16, 8])
@pytest.mark.parametrize("wbits,balanced", WEIGHTS, ids=lambda v: str(v))
def test_matches_reference(wbits, balanced, abits, group):
    for si, (n, k) in enumerate(SHAPES):
        layer = make_layer(wbits, balanced, group, abits, n, k, bias=(si == 1), seed=wbits * 7 + si)
        for m in (1, 3, 16, 100):
            x = random_x(m, k, seed=m + 31 * si + wbits)
            ref = linear_reference(layer, x.double())
            for isa in isas():
                y = run(layer, x, isa)
                check_close(y, ref, "float" if abits == 16 else "int",
                            f"W{wbits}{'*' if balanced else ''}A{abits}g{group} N{n} K{k} M{m} isa{isa}")


@pytest.mark.parametrize("isa", [1, 2, 3], ids=lambda v: ISA_NAMES[v])
@pytest.mark.parametrize("abits", [16, 8])
def test_isa_matches_reference(isa, abits):
    """One level at a time (skipped where the CPU lacks it): every storage width and balanced ones, per channel and
    g32/g64/g128 with a short last group, odd N and K, the token counts of each tile path (1..5, 7, 16, 33),
    static and dynamic activations, bias, into NaN-poisoned outputs."""
    if isa > best_isa():
        pytest.skip(f"this CPU lacks {ISA_NAMES[isa]} (best level: {ISA_NAMES[best_isa()]})")
    shapes = [(37, 608), (9, 200)]  # K = 608: 19 runs, g64/g128 end on a lone run; 200: K % 32 != 0
    for wbits, balanced in WEIGHTS:
        for group in (0, 32, 64, 128):
            for si, (n, k) in enumerate(shapes):
                static = abits == 8 and (wbits + group // 32 + si) % 3 == 0
                layer = make_layer(wbits, balanced, group, abits, n, k, bias=si == 0, static=static,
                                   seed=wbits * 13 + group + si)
                ms = (1, 2, 3, 4, 5, 7, 16, 33) if si == 0 else (1, 4, 17)
                x = random_x(max(ms), k, seed=wbits + group + si)
                ref = linear_reference(layer, x.double())
                for m in ms:
                    what = f"W{wbits}{'*' if balanced else ''}A{abits}g{group} N{n} K{k} M{m} static={static}"
                    check_close(run(layer, x[:m], isa), ref[:m], "float" if abits == 16 else "int", what)


@pytest.mark.parametrize("abits,sym,static", [(2, False, False), (4, False, False), (5, True, False),
                                              (6, False, True), (7, False, False), (8, True, False),
                                              (8, False, True)])
@pytest.mark.parametrize("wbits,balanced,group", [(4, False, 64), (2, True, 0), (7, False, 32), (8, False, 128),
                                                  (3, False, 32)])
def test_activation_schemes(abits, sym, static, wbits, balanced, group):
    n, k = 19, 160
    layer = make_layer(wbits, balanced, group, abits, n, k, bias=True, sym_act=sym, static=static, seed=abits)
    for m in (1, 4, 5, 37):
        x = random_x(m, k, seed=m)
        ref = linear_reference(layer, x.double())
        for isa in isas():
            check_close(run(layer, x, isa), ref, "int", f"A{abits} sym={sym} static={static} M{m} isa{isa}")


@pytest.mark.parametrize("wbits,balanced,group,abits", [(4, False, 64, 16), (3, False, 0, 16), (2, True, 32, 8),
                                                        (8, False, 128, 8), (6, False, 0, 4)])
def test_exact_with_unit_scales(wbits, balanced, group, abits):
    """Unit weight scales and integer activations spanning [0, qmax] make every product and sum an exact
    integer in fp32 (|y| < 2^24), so any difference from the reference is a bug, not rounding."""
    n, k = 24, 200
    layer = make_layer(wbits, balanced, group, abits, n, k, seed=3)
    layer.scales.fill_(1.0)
    qmax = 2 ** abits - 1 if abits != 16 else 7
    g = torch.Generator().manual_seed(5)
    for m in (1, 2, 6, 20):
        x = torch.randint(0, qmax + 1, (m, k), generator=g).float()
        x[:, 0], x[:, 1] = 0, qmax  # per-token range [0, qmax]: scale 1, zero 0
        ref = linear_reference(layer, x.double())
        for isa in isas():
            for mm in (0, 1):
                y = run(layer, x, isa, mm_from_m=mm)
                assert torch.equal(y.double(), ref), f"M{m} isa{isa} mm{mm}: {(y.double() - ref).abs().max()}"


@pytest.mark.parametrize("m", [1, 4, 5, 16, 40])
def test_float_paths_agree(m):
    """A16: in-register kernels (M <= 4), row-buffer kernels, and per-call dequantize + at::mm."""
    layer = make_layer(5, False, 64, 16, 300, 1000, bias=True, seed=9)
    x = random_x(m, 1000, seed=m)
    ref = linear_reference(layer, x.double())
    for isa in isas():
        for mm in (0, 1, m + 1):
            check_close(run(layer, x, isa, mm_from_m=mm), ref, "float", f"M{m} isa{isa} mm_from_m={mm}")


def test_long_per_channel_rows_flush_int32():
    """Per-channel rows longer than the int32 segment (8192 columns) at 8 bits."""
    layer = make_layer(8, False, 0, 8, 3, 20000, seed=1)
    x = random_x(2, 20000, seed=2) * 10
    ref = linear_reference(layer, x.double())
    for isa in isas():
        check_close(run(layer, x, isa), ref, "int", f"isa{isa}")


def test_act_quant_matches_primitives_bit_for_bit():
    # max - min = 127.5 at 8 bits gives the scale 0.5 exactly: x / s hits .5 ties (round half to even).
    ties = torch.tensor([[0.0, 127.5, 0.25, 0.75, 1.25, 1.75, 100.25, 3.0]])
    for spec in (ActSpec(8), ActSpec(4), ActSpec(8, symmetric=True), ActSpec(3, symmetric=True)):
        for x in (ties, random_x(5, 77, seed=1), random_x(3, 64, seed=2).abs(), -random_x(2, 40, seed=3).abs()):
            layer = QuantLinear(x.shape[1], 4, LayerSpec(WeightSpec(4), spec))
            s, z = P.act_qparams(x, spec)
            u = P.quantize_act(x, spec, s, z)
            codes, sx, zx = registry.select("act_quant", "cpu", layer, torch.device("cpu")).fn(layer, x)
            assert torch.equal(sx, s.reshape(-1)) and torch.equal(zx, z.reshape(-1))
            assert codes.dtype == torch.uint8 and torch.equal(codes.float(), u)
            ref_codes, ref_s, ref_z = registry.select("act_quant", "reference", layer, torch.device("cpu")).fn(layer, x)
            assert torch.equal(codes, ref_codes) and torch.equal(sx, ref_s) and torch.equal(zx, ref_z)


def near_ties(rows: int, seed: int) -> torch.Tensor:
    """Rows whose values sit on and one ulp around the rounding ties x / s = k + 1/2 for an inexact 8-bit scale:
    a kernel that multiplies by 1/s, or rounds half away from zero, gets some codes wrong here."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        lo, hi = -float(torch.rand(1, generator=g)) * 3 - 0.1, float(torch.rand(1, generator=g)) * 5 + 0.1
        s, _ = P.act_qparams(torch.tensor([[lo, hi]]), ActSpec(8))
        z = torch.round(torch.tensor(-lo) / s.reshape(()))
        t = ((torch.arange(255, dtype=torch.float32) + 0.5 - z) * s.reshape(())).float()
        row = torch.cat([torch.tensor([lo, hi]), t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1)])
        out.append(row[torch.randperm(row.numel(), generator=g)])  # lo, hi stay the row's min and max
    return torch.stack(out)


def test_act_quant_exact_near_ties():
    x = near_ties(6, seed=0)
    spec = ActSpec(8)
    s, z = P.act_qparams(x, spec)
    u = P.quantize_act(x, spec, s, z)
    for isa in isas():
        codes, sx, zx = torch.ops.abqllm_cpu.act_quant.default(x, 8, False, None, None, isa)
        assert torch.equal(sx, s.reshape(-1)) and torch.equal(zx, z.reshape(-1))
        assert torch.equal(codes.float(), u), f"isa{isa}: {(codes.float() != u).sum().item()} codes differ"
    layer = make_layer(4, False, 32, 8, 16, x.shape[1], seed=1)  # and through the linear kernels
    ref = linear_reference(layer, x.double())
    for isa in isas():
        check_close(run(layer, x, isa), ref, "int", f"isa{isa}")


def test_static_act_quant_matches_primitives():
    layer = make_layer(4, False, 0, 8, 4, 64, static=True)
    x = random_x(5, 64, seed=3) * 3  # beyond the calibrated range: clamps
    codes, sx, zx = cpu.act_quant(x, 8, False, layer.act_scale, layer.act_zero)
    assert torch.equal(codes.float(), P.quantize_act(x, layer.spec.act, layer.act_scale, layer.act_zero))
    assert torch.equal(sx, layer.act_scale.expand(5)) and torch.equal(zx, layer.act_zero.expand(5))


def test_row_offsets_follow_weight_updates():
    """The per-row zero-point term is cached per qweight; in-place updates and replaced buffers refresh it."""
    layer = make_layer(4, False, 32, 8, 16, 96, seed=4)
    x = random_x(2, 96, seed=4)
    check_close(cpu.linear_cpu(layer, x).double(), linear_reference(layer, x.double()), "int", "first")
    layer.zeros.copy_(torch.randint(0, 16, layer.zeros.shape, dtype=torch.uint8))
    check_close(cpu.linear_cpu(layer, x).double(), linear_reference(layer, x.double()), "int", "zeros in place")
    layer.scales = layer.scales * 2
    check_close(cpu.linear_cpu(layer, x).double(), linear_reference(layer, x.double()), "int", "scales replaced")
    layer.qweight.bitwise_xor_(0x11111111)
    check_close(cpu.linear_cpu(layer, x).double(), linear_reference(layer, x.double()), "int", "qweight in place")


def test_auto_picks_cpu_and_layer_forward():
    layer = make_layer(4, False, 64, 8, 24, 130, bias=True, seed=11)
    assert registry.select("linear", "auto", layer, torch.device("cpu")).name == "cpu"
    x = random_x(6, 130, seed=5).reshape(2, 3, 130)
    y = layer(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    check_close(y.reshape(6, 24), linear_reference(layer, x.reshape(6, 130).double()), "int")
    xb = x.to(torch.bfloat16)  # computed in fp32 from the bf16 values, returned in bf16
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16
    ref = linear_reference(layer, xb.reshape(6, 130).double())
    assert ((yb.reshape(6, 24).double() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-3 * ref.abs().max()).all()


def test_float64_and_autograd_use_the_torch_path():
    layer = make_layer(3, False, 32, 16, 8, 64, seed=2)
    x = random_x(3, 64, seed=1).double()
    assert torch.equal(cpu.linear_cpu(layer, x), linear_dequant(layer, x))
    xg = random_x(3, 64, seed=1).requires_grad_()
    y = cpu.linear_cpu(layer, xg)
    y.sum().backward()
    assert xg.grad is not None and torch.allclose(xg.grad, layer.dequantized_weight().sum(0).expand(3, 64))


def test_unsupported_group_size_falls_back():
    layer = make_layer(4, False, 48, 8, 8, 96)
    assert not cpu.supports(layer, torch.device("cpu"))
    assert registry.select("linear", "auto", layer, torch.device("cpu")).name == "torch"
    layer.kernel = "cpu"
    with pytest.raises(Exception, match="does not support"):
        layer(random_x(1, 96, seed=0))


def test_op_schema_and_fake_tensor():
    layer = make_layer(4, False, 32, 8, 16, 64, bias=True, seed=2)
    x = random_x(3, 64, seed=9)
    off = cpu.row_offsets(layer.qweight, layer.scales, layer.zeros, 64, 4, 32)
    args = (x, layer.qweight, layer.scales, layer.zeros, layer.bias, None, None, off, 64, 4, 32, 8, False, cpu.isa(), 16)
    torch.library.opcheck(torch.ops.abqllm_cpu.linear.default, args, test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda t: cpu.qlinear(t, layer.qweight, layer.scales, layer.zeros, layer.bias, None, None,
                                             64, 4, 32, 8, False, offsets=off), backend="aot_eager", fullgraph=True)
    check_close(fn(x).double(), linear_reference(layer, x.double()), "int")


def _child(env_extra: dict, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


FALLBACK_CHILD = """
import logging, torch
logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(message)s")
from abqllm.kernels import registry
from abqllm.nn import QuantLinear
from abqllm.spec import ActSpec, LayerSpec, WeightSpec
layer = QuantLinear.from_float(torch.nn.Linear(64, 8), LayerSpec(WeightSpec(4), ActSpec(8)))
for _ in range(3):
    y = layer(torch.randn(2, 64))
print("KERNEL", registry.select("linear", "auto", layer, torch.device("cpu")).name, tuple(y.shape))
"""


def test_failed_build_falls_back_with_one_line(tmp_path):
    """No compiler: `auto` keeps the torch path and says why once; nothing crashes."""
    proc = _child({"ABQLLM_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}, FALLBACK_CHILD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KERNEL torch (2, 8)" in proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOG WARNING")]
    assert len(warnings) == 1 and "CPU kernels unavailable" in warnings[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_kernels_can_be_turned_off():
    proc = _child({"ABQLLM_CPU_KERNELS": "0"}, FALLBACK_CHILD)
    assert proc.returncode == 0 and "KERNEL torch (2, 8)" in proc.stdout, proc.stderr[-3000:]


def test_logs_choice(caplog):
    layer = make_layer(2, True, 0, 16, 8, 64)
    with caplog.at_level(logging.INFO, logger="abqllm.kernels"):
        registry._LOGGED.discard(("linear", "cpu", "cpu"))
        layer(random_x(1, 64, seed=0))
    assert any("'cpu' kernel" in r.message for r in caplog.records)


def test_two_threads_match_one():
    """Rows split across torch's intra-op threads give the same result (large enough to be split)."""
    layer = make_layer(4, False, 64, 8, 256, 576, seed=6)
    layer16 = make_layer(3, False, 0, 16, 256, 576, seed=7)
    x = random_x(3, 576, seed=8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = [cpu.linear_cpu(layer, x), cpu.linear_cpu(layer16, x)]
        torch.set_num_threads(2)
        got = [cpu.linear_cpu(layer, x), cpu.linear_cpu(layer16, x)]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_layer_under_torch_compile():
    layer = make_layer(4, False, 32, 8, 16, 64, bias=True, seed=3)
    x = random_x(2, 64, seed=4)
    fn = torch.compile(lambda t: cpu.linear_cpu(layer, t), backend="aot_eager", fullgraph=True)
    check_close(fn(x).double(), linear_reference(layer, x.double()), "int")


def test_float_prefill_in_slices():
    """A weight over 32 MB in fp32 is dequantized 8 MB of rows at a time (here 4 slices, the last one short)."""
    layer = make_layer(4, False, 128, 16, 8300, 1024, bias=True, seed=12)
    x = random_x(16, 1024, seed=13)
    ref = linear_reference(layer, x.double())
    for isa in isas():
        check_close(run(layer, x, isa, mm_from_m=1), ref, "float", f"isa{isa}")


def test_a_lock_left_by_a_killed_process_blocks_nothing():
    """torch's cpp_extension.load holds a file lock even when nothing needs building; a process killed inside it
    (kill -9, the OOM killer, the resume test in tests/methods) leaves the lock behind. A finished build is loaded
    without taking it, and an old lock is removed before a rebuild."""
    import subprocess
    import sys

    if not cpu.available():
        pytest.skip("CPU kernels not built")
    lock = cpu._cache_dir() / cpu._build_key() / "lock"
    lock.touch()
    try:
        probe = "from abqllm.kernels import cpu; assert cpu.available()"
        subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)
    finally:
        lock.unlink(missing_ok=True)
