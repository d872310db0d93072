"""GPTQ: per-layer output error no worse than RTN's; what calibrate decides is exactly what QuantLinear stores."""
import dataclasses

import pytest
import torch

import abqllm
from abqllm.methods import get_method
from abqllm.methods.gptq import GPTQ, asymmetric_target, gptq_quantize, refit_scales
from abqllm.nn import QuantLinear
from abqllm.quant import primitives as P
from abqllm.spec import QuantSpec, WeightSpec, parse_scheme
from tests.methods import block_context, linear_inputs, logits_error, same_state, state
from tests.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def layer_inputs():
    model, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    ctx = block_context(model, parse_scheme("W4A16"), ids)
    xs = linear_inputs(ctx, ctx.x_q)
    return {n: (lin.weight.detach().clone(), xs[n]) for n, lin in ctx.linears.items()}


def _rtn(w, spec):
    scale, zero = P.weight_qparams(w, spec)
    return P.dequantize_weight(P.quantize_weight(w, spec, scale, zero), scale, zero, spec.group_size)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [0, 32, 48])  # 48: K = 160 (down_proj) is not a multiple
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_error_not_above_rtn(layer_inputs, bits, group_size, act_order):
    spec = WeightSpec(bits, group_size=group_size)
    for name, (w, x) in layer_inputs.items():
        h = 2 * x.T @ x / x.shape[0]
        codes, scale, zero = gptq_quantize(w, h, spec, act_order=act_order)
        assert codes.shape == w.shape and scale.shape == (w.shape[0], P.num_groups(w.shape[1], group_size))
        assert codes.max() <= spec.qmax
        wq = P.dequantize_weight(codes, scale, zero, group_size)
        err_gptq = (x @ (w - wq).T).norm()
        err_rtn = (x @ (w - _rtn(w, spec)).T).norm()
        assert err_gptq <= err_rtn, (name, err_gptq.item(), err_rtn.item())


def test_static_groups_without_act_order_and_balanced(layer_inputs):
    w, x = layer_inputs["mlp.down_proj"]
    h = 2 * x.T @ x / x.shape[0]
    specs = (WeightSpec(3, group_size=64), WeightSpec(2, balanced=True, group_size=64), WeightSpec(4, symmetric=True))
    for spec in specs:
        codes, scale, zero = gptq_quantize(w, h, spec, static_groups=True)
        wq = P.dequantize_weight(codes, scale, zero, spec.group_size)
        assert (x @ (w - wq).T).norm() <= (x @ (w - _rtn(w, spec)).T).norm()
        # static groups: the qparams are RTN's, computed up front from the unquantized weight
        torch.testing.assert_close((scale, zero), P.weight_qparams(w, spec), rtol=0, atol=0)


def test_dead_input_channel(layer_inputs):
    w, x = layer_inputs["self_attn.q_proj"]
    x = x.clone()
    x[:, 5] = 0
    codes, scale, zero = gptq_quantize(w, 2 * x.T @ x / x.shape[0], WeightSpec(4))
    wq = P.dequantize_weight(codes, scale, zero, 0)
    assert torch.isfinite(wq).all() and (wq[:, 5] == 0).all()


@pytest.mark.parametrize("scheme,options", [
    ("W3A16", {}),
    ("W4A16g32", {"act_order": True}),
    ("W3A8g48", {"sequential": False}),
    ("W2*A16g32", {"act_order": True, "block_size": 32}),
    ("W3A16g32", {"asym": 1.0}),
    ("W4A8", {"asym": 0.5, "sequential": False}),
    ("W2*A8g32", {"refit": 2, "asym": 0.25}),
    ("W4A16", {"refit": 1}),
])
def test_stored_exactly_what_calibrate_decided(scheme, options):
    model, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    spec = parse_scheme(scheme)
    ctx = block_context(model, spec, ids)
    method = GPTQ(**options)
    before = state(ctx.block)
    result = method.calibrate(ctx)
    assert same_state(ctx.block, before)  # calibrate leaves the block alone
    layers = method.apply(ctx, result)
    assert set(layers) == set(ctx.linears)
    for name, q in layers.items():
        assert isinstance(q, QuantLinear)
        assert torch.equal(q.codes(), result[f"{name}.codes"])
        assert torch.equal(q.scales.float(), result[f"{name}.scale"])
        assert torch.equal(q.zeros.float(), result[f"{name}.zero"])
        expect = P.dequantize_weight(result[f"{name}.codes"], result[f"{name}.scale"], result[f"{name}.zero"],
                                     spec.weight.group_size)
        assert torch.equal(q.dequantized_weight(), expect)


def test_sequential_sees_quantized_earlier_linears():
    """o_proj's Hessian differs between sequential and all-at-once; q/k/v's do not."""
    model, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    ctx = block_context(model, parse_scheme("W3A16"), ids)
    seq, flat = GPTQ(sequential=True).calibrate(ctx), GPTQ(sequential=False).calibrate(ctx)
    assert torch.equal(seq["self_attn.q_proj.codes"], flat["self_attn.q_proj.codes"])
    assert not torch.equal(seq["mlp.down_proj.codes"], flat["mlp.down_proj.codes"])


def test_end_to_end_better_than_rtn_and_reapplies(tmp_path):
    fp, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fp(ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model, _ = make_tiny_llama()
        abqllm.quantize(model, "W3A16", method=method, calib_ids=ids, progress=False,
                        artifacts=tmp_path / method)
        errors[method] = logits_error(model, ref, ids)
    assert errors["gptq"] < errors["rtn"]
    again, _ = make_tiny_llama()  # re-apply the stored calibration: same model
    abqllm.quantize(again, "W3A16", method="gptq", calib_ids=ids, progress=False, artifacts=tmp_path / "gptq")
    assert logits_error(again, ref, ids) == errors["gptq"]


def test_static_activations_get_ranges():
    model, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (4, 32))
    spec = QuantSpec(WeightSpec(4), abqllm.ActSpec(8, dynamic=False))
    abqllm.quantize(model, spec, method="gptq", calib_ids=ids, progress=False)
    assert model.model.layers[1].mlp.down_proj.act_scale.item() != 1.0


def test_options_and_settings():
    m = get_method("gptq", act_order=True, percdamp=0.05)
    assert m.settings() == {"percdamp": 0.05, "block_size": 128, "act_order": True, "static_groups": False,
                            "sequential": True}  # asym left out while off: older artifacts keep their keys
    assert get_method("gptq", asym=0.25).settings()["asym"] == 0.25
    assert get_method("gptq", refit=2).settings()["refit"] == 2  # refit likewise left out while off
    for bad in (True, -1, 1.5, 9):
        with pytest.raises(abqllm.AbqError, match="refit must be a whole number"):
            get_method("gptq", refit=bad)
    with pytest.raises(abqllm.AbqError, match="asym must be in"):
        get_method("gptq", asym=2.0)
    assert dataclasses.replace(m, block_size=64).block_size == 64
    with pytest.raises(abqllm.AbqError, match="bad option"):
        get_method("gptq", groupsize=3)


def _streams(n=512, k=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(n, k, generator=g) * torch.linspace(0.2, 3, k)
    # a quantized stream drifts: a systematic part (per-channel gain) that a weight can undo, and noise
    x_q = x_fp * (1 + 0.2 * torch.randn(k, generator=g)) + 0.05 * torch.randn(n, k, generator=g)
    w = torch.randn(24, k, generator=g)
    return w, x_fp, x_q


def test_asymmetric_target_is_the_least_squares_weight():
    w, x_fp, x_q = _streams()
    h, d = 2 * x_q.T @ x_q / len(x_q), 2 * (x_fp - x_q).T @ x_q / len(x_q)
    target = asymmetric_target(w, h, d, percdamp=0.0)
    lstsq = torch.linalg.lstsq(x_q, x_fp @ w.T).solution.T
    torch.testing.assert_close(target, lstsq, rtol=1e-3, atol=1e-3)
    err = lambda v: (x_fp @ w.T - x_q @ v.T).norm()  # noqa: E731
    assert err(target) < 0.5 * err(w)
    half = asymmetric_target(w, h, d, percdamp=0.0, strength=0.5)
    torch.testing.assert_close(half, (w + target) / 2, rtol=1e-4, atol=1e-4)
    same = asymmetric_target(w, h, torch.zeros_like(d), percdamp=0.01)  # same streams: no shift
    torch.testing.assert_close(same, w, rtol=0, atol=0)


@pytest.mark.parametrize("spec", [WeightSpec(3), WeightSpec(4, group_size=16)])
def test_gptq_on_the_asymmetric_target_matches_the_float_stream_better(spec):
    """The float-stream output error of GPTQ(W*) is below that of GPTQ(W): the decomposition in gptq.py."""
    w, x_fp, x_q = _streams(seed=1)
    h, d = 2 * x_q.T @ x_q / len(x_q), 2 * (x_fp - x_q).T @ x_q / len(x_q)
    errors = {}
    for name, wt in {"plain": w, "asym": asymmetric_target(w, h, d, 0.01)}.items():
        codes, scale, zero = gptq_quantize(wt, h, spec, act_order=True)
        wq = P.dequantize_weight(codes, scale, zero, spec.group_size)
        errors[name] = (x_fp @ w.T - x_q @ wq.T).norm().item()
    assert errors["asym"] < 0.9 * errors["plain"], errors


@pytest.mark.parametrize("option,off,on", [("asym", 0.0, 1.0), ("refit", 0, 1)])
def test_option_end_to_end_closer_to_float_than_plain_gptq(option, off, on):
    fp, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fp(ids).logits
    errors = {}
    for value in (off, on):
        model, _ = make_tiny_llama()
        abqllm.quantize(model, "W2A16g32", method="gptq", calib_ids=ids, progress=False, **{option: value})
        errors[value] = logits_error(model, ref, ids)
    assert errors[on] < errors[off], errors


@pytest.mark.parametrize("spec", [WeightSpec(4), WeightSpec(3, group_size=16), WeightSpec(2, group_size=20),
                                  WeightSpec(2, balanced=True), WeightSpec(4, symmetric=True, group_size=16)])
def test_refit_scales_is_the_least_squares_scale(spec):
    """For fixed codes the refit scale minimises the layer's output error: it matches a direct least-squares
    fit (up to the float16 grid) and never does worse than the scale GPTQ started from."""
    w, _, x = _streams(seed=2)
    h = 2 * x.T @ x / len(x)
    codes, scale, zero = gptq_quantize(w, h, spec, act_order=True)
    new = refit_scales(w, h, codes, scale, zero, spec.group_size, percdamp=0.0)
    assert new.shape == scale.shape and torch.equal(new, new.half().float())
    err = lambda s: (x @ (w - P.dequantize_weight(codes, s, zero, spec.group_size)).T).norm().item()  # noqa: E731
    assert err(new) < err(scale)
    # the same fit by torch.linalg.lstsq, one row at a time: columns of x times the centred codes of each group
    d = codes.float() - P.expand_groups(zero, w.shape[1], spec.group_size)
    groups = P.expand_groups(torch.arange(scale.shape[1]).float()[None], w.shape[1], spec.group_size)[0].long()
    for r in range(0, w.shape[0], 5):
        design = torch.stack([x[:, groups == j] @ d[r, groups == j] for j in range(scale.shape[1])], 1)
        ref = torch.linalg.lstsq(design, x @ w[r]).solution
        torch.testing.assert_close(new[r], ref, rtol=2e-3, atol=1e-5)


def test_refit_scales_keeps_what_it_cannot_improve():
    w, _, x = _streams(seed=3)
    h = 2 * x.T @ x / len(x)
    spec = WeightSpec(2, group_size=16)
    codes, scale, zero = gptq_quantize(w, h, spec)
    codes[0, :16] = zero[0, 0].to(torch.uint8)  # row 0, group 0: every code at the zero point
    new = refit_scales(w, h, codes, scale, zero, spec.group_size)
    assert new[0, 0] == scale[0, 0]  # that group's scale does not matter: kept
    assert torch.isfinite(new).all() and (new > 0).all()
