import pytest
import torch

from abqllm.errors import AbqError
from abqllm.quant import primitives as P
from abqllm.spec import ActSpec, QuantSpec, WeightSpec, parse_scheme


def _w(n=8, k=100, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group_size", [0, 32, 64])
def test_codes_in_range_and_error_bounded(bits, group_size):
    spec = WeightSpec(bits, group_size=group_size)
    w = _w()
    s, z = P.weight_qparams(w, spec)
    codes = P.quantize_weight(w, spec, s, z)
    assert int(codes.max()) <= spec.qmax
    deq = P.dequantize_weight(codes, s, z, group_size)
    step = P.expand_groups(s, w.shape[1], group_size)
    # Half a step inside the range; up to one step at the ends, where the rounded zero point shifts the grid.
    assert ((deq - w).abs() <= step * 1.001).all()
    assert ((deq - w).abs() <= step / 2 + 1e-6).float().mean() > 0.95
    assert torch.allclose(P.fake_quant_weight(w, spec), deq)


def test_more_bits_less_error():
    w = _w(32, 256)
    errs = [(P.fake_quant_weight(w, WeightSpec(b)) - w).pow(2).mean() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_groups_beat_per_channel():
    w = _w(32, 256)
    e_pc = (P.fake_quant_weight(w, WeightSpec(3)) - w).pow(2).mean()
    e_g = (P.fake_quant_weight(w, WeightSpec(3, group_size=32)) - w).pow(2).mean()
    assert e_g < e_pc


def test_balanced_levels_are_symmetric_five_for_w2star():
    spec = WeightSpec(2, balanced=True)
    assert spec.storage_bits == 3 and spec.qmax == 4 and spec.symmetric
    w = _w(4, 64)
    s, z = P.weight_qparams(w, spec)
    assert (z == 2).all()
    levels = torch.unique(P.quantize_weight(w, spec, s, z).int() - 2)
    assert set(levels.tolist()) <= {-2, -1, 0, 1, 2} and len(levels) == 5


def test_group_padding_ignores_missing_columns():
    w = _w(4, 70)  # groups of 32: last group has 6 real columns
    lo, hi = P.group_minmax(w, 32)
    assert torch.equal(lo[:, 2], w[:, 64:].amin(1)) and torch.equal(hi[:, 2], w[:, 64:].amax(1))


def test_scales_lie_on_fp16_grid():
    s, _ = P.weight_qparams(_w(), WeightSpec(4, group_size=32))
    assert torch.equal(s, s.half().float())


def test_ste_passes_gradients_to_weights_and_clip():
    w = _w().requires_grad_()
    lo = torch.full((8, 1), -1.0, requires_grad=True)
    hi = torch.full((8, 1), 1.0, requires_grad=True)
    P.fake_quant_weight(w, WeightSpec(3), lo, hi).pow(2).sum().backward()
    assert w.grad.abs().sum() > 0 and hi.grad.abs().sum() > 0 and lo.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_activation_fake_quant_error(bits, symmetric):
    spec = ActSpec(bits, symmetric=symmetric)
    x = torch.randn(5, 64) * torch.linspace(0.1, 10, 5).unsqueeze(1)
    s, z = P.act_qparams(x, spec)
    xq = P.fake_quant_act(x, spec)
    assert ((xq - x).abs() <= s / 2 * 1.0001 + 1e-6).all()
    assert P.fake_quant_act(x, ActSpec(16)) is x


@pytest.mark.parametrize("bad", [0, 9, "x", -1, 2.5])
def test_bad_weight_bits(bad):
    with pytest.raises(AbqError, match="weight bits"):
        WeightSpec(bad)


@pytest.mark.parametrize("bad", [1, 9, 12, "y"])
def test_bad_act_bits(bad):
    with pytest.raises(AbqError, match="activation bits"):
        ActSpec(bad)


def test_bad_group_size():
    with pytest.raises(AbqError, match="group size"):
        WeightSpec(4, group_size=-8)


def test_scheme_names_and_round_trip():
    spec = parse_scheme("W2*A8")
    assert spec.weight.balanced and spec.act.bits == 8 and spec.name == "W2*A8"
    assert parse_scheme("w4a16g64").weight.group_size == 64
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(AbqError, match="version"):
        QuantSpec.from_dict({**spec.to_dict(), "version": 99})
    with pytest.raises(AbqError):
        parse_scheme("W4")
