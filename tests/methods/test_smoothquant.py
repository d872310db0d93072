"""SmoothQuant: the fold is an equivalence; smoothing lowers activation-quantization error with outliers."""
import pytest
import torch

import abqllm
from abqllm.methods import get_method
from abqllm.methods.smoothquant import SmoothQuant, smooth_scales
from abqllm.nn import QuantLinear
from abqllm.spec import parse_scheme
from tests.methods import block_context, inject_outliers, logits_error, same_state, state
from tests.methods.test_transforms import _randomize
from tests.models.test_arch import tiny_model
from tests.tiny import make_tiny_llama


def test_scales_formula_and_zero_guard():
    s = smooth_scales(torch.tensor([4.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), alpha=0.5)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[0].item() == pytest.approx(2.0)
    assert smooth_scales(torch.tensor([9.0]), torch.tensor([4.0]), alpha=0.75).item() == pytest.approx(
        9 ** 0.75 / 4 ** 0.25)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                                          "OPTForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("linear_prevs", [False, True])
@torch.no_grad()
def test_fold_keeps_float_block_output(architecture, linear_prevs):
    model = tiny_model(architecture)
    _randomize(model)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    ctx = block_context(model, parse_scheme("W8A8"), ids)
    ref = ctx.run(ctx.block, ctx.x_fp)
    sq = SmoothQuant(linear_prevs=linear_prevs)
    before = state(ctx.block)
    found = sq.search(ctx)
    assert same_state(ctx.block, before)
    n_norm = sum(g.prev in ctx.arch.norms for g in ctx.arch.groups)
    assert len(found) == (sum(g.prev is not None for g in ctx.arch.groups) if linear_prevs else n_norm)
    assert all(not torch.allclose(s, torch.ones_like(s)) for s in found.values())
    sq.fold(ctx.block, ctx, found)
    assert not same_state(ctx.block, before)
    out = ctx.run(ctx.block, ctx.x_fp)
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4), (out - ref).abs().max()


@pytest.mark.parametrize("scheme", ["W8A8", "W4A8"])
def test_smoothing_lowers_error_with_outliers(scheme):
    fp, tok = make_tiny_llama()
    inject_outliers(fp)
    ids = torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    test_ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp(test_ids).logits
    errors = {}
    for method in ("rtn", "smoothquant", "smoothquant+gptq"):
        model, _ = make_tiny_llama()
        inject_outliers(model)
        abqllm.quantize(model, scheme, method=method, calib_ids=ids, progress=False)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
        errors[method] = logits_error(model, ref, test_ids)
    assert errors["smoothquant"] < 0.8 * errors["rtn"], errors
    assert errors["smoothquant+gptq"] < errors["rtn"], errors


def test_static_activation_ranges_measured_after_smoothing():
    model, tok = make_tiny_llama()
    inject_outliers(model)
    ids = torch.randint(0, len(tok), (4, 32))
    spec = abqllm.QuantSpec(abqllm.WeightSpec(8), abqllm.ActSpec(8, dynamic=False))
    ref, _ = make_tiny_llama()
    inject_outliers(ref)
    abqllm.quantize(ref, spec, method="rtn", calib_ids=ids, progress=False)
    abqllm.quantize(model, spec, method="smoothquant", calib_ids=ids, progress=False)
    # q_proj reads the smoothed norm output: a much smaller static range than without smoothing
    assert model.model.layers[0].self_attn.q_proj.act_scale < 0.5 * ref.model.layers[0].self_attn.q_proj.act_scale


def test_options():
    m = get_method("smoothquant", alpha=0.8)
    assert m.name == "smoothquant" and m.settings()["alpha"] == 0.8 and m.settings()["rounding"] == "rtn"
    m = get_method("smoothquant+gptq", alpha=0.6, act_order=True)
    assert m.settings()["rounding"] == "gptq" and m.rounding.act_order and m.transform.alpha == 0.6
    with pytest.raises(abqllm.AbqError, match="n_grid"):
        get_method("smoothquant", n_grid=3)
