"""AWQ: never worse than RTN on its objective, better on a model with outlier channels, fold is exact."""
import pytest
import torch

import abqllm
from abqllm.methods import get_method
from abqllm.methods.awq import AWQ, awq_scales, clip_weight, search_clip, search_scale
from abqllm.methods.gptq import GPTQ
from abqllm.nn import QuantLinear
from abqllm.quant import primitives as P
from abqllm.spec import ActSpec, WeightSpec, parse_scheme
from tests.methods import block_context, inject_outliers, logits_error, same_state, state
from tests.methods.test_transforms import _randomize
from tests.models.test_arch import tiny_model
from tests.tiny import make_tiny_llama


def _outlier_inputs(k=96, n=40, t=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :4] *= 20
    return x, torch.randn(n, k, generator=g) * 0.05


def test_scales_normalized_and_ratio_zero_is_rtn():
    m = torch.rand(10) * 5 + 0.1
    s = awq_scales(m, 0.5)
    assert s.max() * s.min() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(awq_scales(m, 0.0), torch.ones(10))
    x, w = _outlier_inputs()
    spec = WeightSpec(3, group_size=32)
    best, losses = search_scale(x, w, x.abs().mean(0), spec, ActSpec(), 20, head_dim=16)
    rtn = (x @ w.T - x @ P.fake_quant_weight(w, spec).T).pow(2).mean().item()
    assert losses[0] == pytest.approx(rtn, rel=1e-4)
    assert min(losses) < 0.9 * rtn and not torch.equal(best, torch.ones_like(best))


@pytest.mark.parametrize("group_size", [0, 32, 40])  # 40: K = 96 is not a multiple
def test_clip_search(group_size):
    x, w = _outlier_inputs()
    spec = WeightSpec(3, group_size=group_size)
    max_val = search_clip(x, w, spec)
    amax = P.group_minmax(w.abs(), group_size)[1]
    assert max_val.shape == amax.shape and (max_val <= amax).all() and (max_val >= 0.5 * amax - 1e-6).all()
    err = lambda v: (x @ w.T - x @ P.fake_quant_weight(v, spec).T).pow(2).mean()  # noqa: E731
    assert err(clip_weight(w, max_val, group_size)) <= err(w)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma3ForCausalLM", "OPTForCausalLM"])
@torch.no_grad()
def test_scale_fold_keeps_float_block_output(architecture):
    model = tiny_model(architecture)
    _randomize(model)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    ctx = block_context(model, parse_scheme("W3A16g32"), ids)
    ref = ctx.run(ctx.block, ctx.x_q)
    awq = AWQ(clip=False)
    before = state(ctx.block)
    found = awq.search(ctx)
    assert same_state(ctx.block, before)
    assert sorted(found) == sorted(f"smooth.{g.prev}" for g in ctx.arch.groups if g.prev is not None)
    awq.fold(ctx.block, ctx, found)
    out = ctx.run(ctx.block, ctx.x_q)
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("scheme", ["W3A16g32", "W4A16g32", "W3A16"])
def test_awq_better_than_rtn_with_outliers(scheme):
    fp, tok = make_tiny_llama()
    inject_outliers(fp)
    ids = torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    test_ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp(test_ids).logits
    errors = {}
    for method, options in (("rtn", {}), ("awq", {}), ("awq", {"clip": False}), ("awq+gptq", {})):
        model, _ = make_tiny_llama()
        inject_outliers(model)
        abqllm.quantize(model, scheme, method=method, calib_ids=ids, progress=False, **options)
        errors[(method, *options)] = logits_error(model, ref, test_ids)
    assert errors[("awq",)] <= 0.8 * errors[("rtn",)], errors
    assert errors[("awq", "clip")] <= errors[("rtn",)], errors
    assert errors[("awq+gptq",)] <= errors[("rtn",)], errors


def test_awq_gptq_stores_exactly_the_gptq_result_on_the_transformed_block():
    model, tok = make_tiny_llama()
    inject_outliers(model)
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    ctx = block_context(model, parse_scheme("W3A16g32"), ids)
    method = get_method("awq+gptq", n_grid=5)
    before = state(ctx.block)
    result = method.calibrate(ctx)
    assert same_state(ctx.block, before)
    assert any(k.startswith("smooth.") for k in result) and any(k.startswith("clip.") for k in result)
    layers = method.apply(ctx, result)
    for name, q in layers.items():
        assert isinstance(q, QuantLinear)
        assert torch.equal(q.codes(), result[f"{name}.codes"])
        assert torch.equal(q.scales.float(), result[f"{name}.scale"])
    # the norm now carries the AWQ scale
    assert not torch.equal(ctx.block.input_layernorm.weight, before["input_layernorm.weight"])


def test_activation_quantization_enters_the_search():
    model, tok = make_tiny_llama()
    inject_outliers(model)
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    a16 = AWQ(clip=False).search(block_context(model, parse_scheme("W8A16"), ids))
    a4 = AWQ(clip=False).search(block_context(model, parse_scheme("W8A4"), ids))
    assert not torch.equal(a16["smooth.input_layernorm"], a4["smooth.input_layernorm"])


def test_options():
    m = get_method("awq", n_grid=10, clip=False)
    assert m.settings()["n_grid"] == 10 and m.settings()["clip"] is False and m.settings()["rounding"] == "rtn"
    assert isinstance(get_method("awq+gptq").rounding, GPTQ)
    with pytest.raises(abqllm.AbqError, match="alpha"):
        get_method("awq", alpha=0.5)
