"""ABQ's transform initialisations, its fold (clamped weights reproduce the learned clipping ranges)
and the abq+gptq composition."""
import pytest
import torch

import abqllm
from abqllm.methods import abq_math as M
from abqllm.methods import get_method, resolve_preset
from abqllm.methods.abq import ABQ, _groups
from abqllm.methods.awq import AWQ
from abqllm.nn.qlinear import QuantLinear
from abqllm.quant import primitives as P
from tests.methods.test_abq import _ctx
from tests.tiny import make_tiny_llama


def _smooth_params(ctx, method):
    return {k: v for k, v in method.calibrate(ctx).items() if k.startswith("smooth.")}


def test_identity_init_starts_at_zero_log_scales():
    model, _ = make_tiny_llama()
    params = _smooth_params(_ctx(model, "W4A8"), ABQ(epochs=0, init="identity"))
    assert params and all(torch.equal(v, torch.zeros_like(v)) for v in params.values())


def test_awq_init_starts_at_awq_scales():
    model, _ = make_tiny_llama()
    ctx = _ctx(model, "W4A8")
    ctx.x_fp[..., :3] *= 20  # outliers, so AWQ picks a non-trivial scale
    ctx.x_q = ctx.x_fp.clone()
    params = _smooth_params(ctx, ABQ(epochs=0, init="awq"))
    awq = AWQ(clip=False).search(ctx)
    assert len(params) == len(awq) > 0
    for i, g in _groups(ctx):
        torch.testing.assert_close(params[M.group_key(i)], awq[f"smooth.{g.prev}"].log())


def test_unknown_init_is_a_clear_error_before_any_work():
    with pytest.raises(abqllm.AbqError, match="init must be"):
        get_method("abq", init="magic")


@pytest.mark.parametrize("scheme", ["W3A16g32", "W4A8", "W2*A16"])
def test_apply_quantizes_the_folded_weight_on_the_learned_ranges(scheme):
    model, _ = make_tiny_llama()
    ctx = _ctx(model, scheme)
    method = ABQ(epochs=0)
    result = method.calibrate(ctx)
    result = {k: (v - 0.7 if k.startswith("clip.") else v) for k, v in result.items()}  # a real clip
    weights = {n: p.detach().clone() for n, p in ctx.block.named_parameters()}
    new = method._transformed(ctx, weights, result, _groups(ctx))
    layers = method.apply(ctx, result)
    spec = ctx.spec.weight
    for name, q in layers.items():
        w = new.get(f"{name}.weight", weights[f"{name}.weight"])
        lo, hi = M.clip_range(w, spec, result[f"clip.{name}.lo"], result[f"clip.{name}.hi"])
        scale, zero = P.weight_qparams(w, spec, lo, hi)
        assert torch.equal(q.scales.float(), scale) and torch.equal(q.zeros.float(), zero)
        assert torch.equal(q.codes(), P.quantize_weight(w, spec, scale, zero))


def test_gptq_keeps_given_qparams():
    from abqllm.methods.gptq import gptq_quantize
    from abqllm.spec import WeightSpec
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(256, 64)
    spec = WeightSpec(3, group_size=32)
    scale, zero = P.weight_qparams(w, spec, *(t * 0.7 for t in P.group_minmax(w, 32)))
    codes, s2, z2 = gptq_quantize(w, 2 * x.T @ x / 256, spec, act_order=True, qparams=(scale, zero))
    assert torch.equal(s2, scale) and torch.equal(z2, zero) and codes.max() <= spec.qmax


def test_abq_gptq_quantizes_a_model_and_shares_abq_presets():
    assert resolve_preset("abq+gptq", None, "cpu")[0] == resolve_preset("abq", None, "cpu")[0]
    options, data, name = resolve_preset("abq+gptq", "cpu-large", "cpu")  # the cpu recipe on 4x the tokens
    assert options == resolve_preset("abq", "cpu", "cpu")[0] and data == (64, 256) and name == "cpu-large"
    m = get_method("abq+gptq", epochs=1, act_order=True, use_attn=True)
    assert m.rounding.asym == 0.25 and get_method("abq+gptq", asym=0.0).rounding.asym == 0.0
    assert get_method("gptq").asym == 0.0 and get_method("awq+gptq").rounding.asym == 0.0
    assert m.needs_attention_maps and m.settings()["rounding"] == "gptq" and m.settings()["epochs"] == 1
    model, tok = make_tiny_llama()
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    ref_model, _ = make_tiny_llama()
    with torch.no_grad():
        ref = ref_model(ids).logits
    abqllm.quantize(model, "W4A16g32", method="abq+gptq", calib_ids=ids, progress=False, epochs=1, batch_size=2)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).pow(2).mean() < 0.1 * ref.pow(2).mean()


@pytest.mark.parametrize("scheme", ["W2*A16", "W4A8"])
def test_auto_init_keeps_the_start_with_the_lower_step0_loss(scheme):
    model, _ = make_tiny_llama()
    ctx = _ctx(model, scheme)
    ctx.x_fp[..., :3] *= 20  # outliers, so the AWQ start differs from the identity start
    ctx.x_q = ctx.x_fp.clone()
    starts = {k: ABQ(epochs=0, init=k).calibrate(ctx) for k in ("awq", "identity")}
    assert any(not torch.equal(starts["awq"][k], starts["identity"][k]) for k in starts["awq"])
    method = ABQ(epochs=0)
    weights = {n: p.detach() for n, p in ctx.block.named_parameters()}
    t1 = ctx.run(ctx.block, ctx.x_fp)
    a_fp = method._float_attention(ctx)
    idx = torch.arange(ctx.x_q.shape[0])
    with torch.no_grad():
        losses = {k: method._loss(ctx, weights, p, _groups(ctx), idx, t1, t1, a_fp)[0].item() for k, p in starts.items()}
    best = min(losses, key=losses.get)
    auto, again = method.calibrate(ctx), method.calibrate(ctx)
    assert auto.keys() == starts[best].keys()
    for k in auto:  # the chosen start, exactly, and the same choice every time
        assert torch.equal(auto[k], starts[best][k]) and torch.equal(auto[k], again[k])


def test_auto_init_without_transforms_tries_no_awq_search(monkeypatch):
    model, _ = make_tiny_llama()
    monkeypatch.setattr(AWQ, "search", lambda *a, **k: pytest.fail("AWQ searched without transforms"))
    result = ABQ(epochs=0, smooth=False).calibrate(_ctx(model, "W2*A16"))
    assert not any(k.startswith("smooth.") for k in result)


def test_clip_start_with_quantized_activations_is_weighted_by_the_inputs():
    # identity transforms leave every linear's input as it is, so the clip grid must start where
    # it starts without transforms (it used to run unweighted there and clip the busy columns)
    model, _ = make_tiny_llama()
    ctx = _ctx(model, "W4A8")
    ctx.x_fp[..., :3] *= 20
    ctx.x_q = ctx.x_fp.clone()
    with_t = ABQ(epochs=0, init="identity").calibrate(ctx)
    without = ABQ(epochs=0, smooth=False).calibrate(ctx)
    clips = [k for k in without if k.startswith("clip.")]
    assert clips and all(torch.equal(with_t[k], without[k]) for k in clips)
