"""The integer engine equals the fake-quant float path; the bit-plane popcount form equals the integer engine."""
import pytest
import torch

from abqllm.kernels.reference import bitplane_dot, integer_dot, linear_bitplane, linear_dequant, linear_reference
from abqllm.nn import QuantLinear
from abqllm.quant import primitives as P
from abqllm.spec import ActSpec, LayerSpec, WeightSpec

CASES = [(w, a, g) for w in (1, 2, 3, 4, 8) for a in (4, 8, 16) for g in (0, 32)] + [
    ("2*", 8, 0), ("2*", 4, 64), ("1*", 8, 0), (5, 6, 0), (6, 6, 64), (7, 5, 32), (4, 2, 0)]


def _spec(w, a, g, sym_act=False):
    ws = WeightSpec(int(str(w)[0]), balanced="*" in str(w), group_size=g)
    return LayerSpec(ws, ActSpec(a, symmetric=sym_act))


def _layer(spec, n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_float(lin, spec)


def _fake_quant_float64(layer, x):
    """The float path: fake-quant activations times dequantized weights, all in float64."""
    xd = x.double()
    if not layer.spec.act.is_float:
        s, z = layer.act_qparams(x)
        xd = (P.quantize_act(x, layer.spec.act, s, z).double() - z.double()) * s.double()
    y = xd @ layer.dequantized_weight(torch.float64).T
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("w,a,g", CASES)
@pytest.mark.parametrize("n,k", [(16, 64), (9, 70), (5, 33)])
def test_integer_engine_equals_fake_quant(w, a, g, n, k):
    spec = _spec(w, a, g, sym_act=(k == 33))
    layer = _layer(spec, n, k, bias=(n == 9), seed=n * k)
    x = torch.randn(3, 4, k, dtype=torch.float64) * 2 + 0.3
    ref = linear_reference(layer, x)
    expect = _fake_quant_float64(layer, x.reshape(-1, k)).reshape(3, 4, n)
    assert torch.allclose(ref, expect, rtol=1e-10, atol=1e-10)
    fast = linear_dequant(layer, x.float())
    assert torch.allclose(fast.double(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("w,a,g", [c for c in CASES if c[1] != 16])
def test_bitplane_equals_integer_engine(w, a, g):
    spec = _spec(w, a, g)
    layer = _layer(spec, 6, 70, bias=False, seed=1)
    x = torch.randn(4, 70, dtype=torch.float64)
    assert torch.equal(linear_bitplane(layer, x), linear_reference(layer, x))


@pytest.mark.parametrize("p,q", [(1, 1), (3, 5), (8, 8), (2, 4)])
def test_popcount_dot_is_exact(p, q):
    x = torch.randint(0, 2 ** q, (3, 100))
    w = torch.randint(0, 2 ** p, (5, 100))
    assert torch.equal(bitplane_dot(x, q, w, p, 0), integer_dot(x, w, 0))
    assert torch.equal(integer_dot(x, w, 0)[..., 0], (x @ w.T).double())


def test_static_activation_scale():
    spec = LayerSpec(WeightSpec(4), ActSpec(8, dynamic=False))
    lin = torch.nn.Linear(32, 8)
    q = QuantLinear.from_float(lin, spec, act_range=(-3.0, 5.0))
    x = torch.rand(2, 32, dtype=torch.float64) * 8 - 3
    assert torch.allclose(linear_reference(q, x), _fake_quant_float64(q, x), atol=1e-10)
    assert abs(q.act_scale.item() - 8 / 255) < 1e-7
