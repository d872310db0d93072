"""Block tuning after rounding (methods/block_tuning.py): codes fixed, scales and norms trained."""
import copy
import dataclasses

import pytest
import torch

import abqllm
from abqllm.methods import get_method
from abqllm.methods.block_tuning import TUNED, BlockTuning, apply_tuned
from abqllm.methods.gptq import GPTQ
from abqllm.nn.qlinear import QuantLinear
from tests.methods.test_abq import _ctx
from tests.tiny import make_tiny_llama


def _rounded(scheme="W2*A16", n=8, positions=None):
    """A context, a working copy of its block and GPTQ's codes/scales/zeros for it."""
    model, _ = make_tiny_llama()
    ctx = _ctx(model, scheme, n=n)
    work = copy.deepcopy(ctx.block)
    inner = dataclasses.replace(ctx, block=work, linears={k: work.get_submodule(k) for k in ctx.linears})
    return ctx, inner, GPTQ().calibrate(inner, positions=positions)


def _block_mse(ctx, inner, res):
    """The block built from a rounding (+ tuning) result against the float block, on the calibration windows."""
    layers = GPTQ().apply(inner, res)
    block = copy.deepcopy(inner.block)
    apply_tuned(block, res)
    for name, q in layers.items():
        block.set_submodule(name, q)
    return (ctx.run(block, ctx.x_q) - ctx.run(ctx.block, ctx.x_fp)).pow(2).mean()


@pytest.mark.parametrize("scheme", ["W2*A16", "W3A8g32"])
def test_tuning_lowers_the_block_loss_and_keeps_the_codes(scheme):
    ctx, inner, result = _rounded(scheme)
    tuned = BlockTuning(tune_epochs=4, tune_lr=1e-2, tune_batch=2).tune(ctx, inner, result)
    scales = {k for k in tuned if k.endswith(".scale")}
    assert scales == {f"{n}.scale" for n in ctx.linears}
    assert not any(k.endswith(".codes") or k.endswith(".zero") for k in tuned)
    norms = [k for k in tuned if k.startswith(TUNED)]
    assert norms and all(k.endswith("norm.weight") for k in norms)
    assert any(not torch.equal(tuned[k], result[k]) for k in scales)
    for k in scales:  # stored on the format's float16 grid, positive
        assert torch.equal(tuned[k], tuned[k].half().float()) and (tuned[k] > 0).all()

    assert _block_mse(ctx, inner, {**result, **tuned}) < _block_mse(ctx, inner, result)


def test_tuning_that_does_not_help_is_dropped():
    ctx, inner, result = _rounded()
    # a step so large the first update overshoots: the tuned block is worse and nothing is returned
    assert BlockTuning(tune_epochs=1, tune_lr=5.0, tune_batch=8).tune(ctx, inner, result) == {}


def test_held_out_windows_pick_the_epoch():
    ctx, inner, result = _rounded(n=8)
    torch.manual_seed(0)
    tuned = BlockTuning(tune_epochs=3, tune_lr=1e-2, tune_batch=2, tune_holdout=0.25).tune(ctx, inner, result)
    assert {k for k in tuned if k.endswith(".scale")} == {f"{n}.scale" for n in ctx.linears}
    for k in tuned:
        if k.endswith(".scale"):
            assert torch.equal(tuned[k], tuned[k].half().float())
    # a step so large every epoch is worse on the held-out windows: nothing is kept
    torch.manual_seed(0)
    assert BlockTuning(tune_epochs=2, tune_lr=5.0, tune_batch=2, tune_holdout=0.25).tune(ctx, inner, result) == {}


def test_tuning_without_codes_is_a_clear_error():
    ctx, inner, result = _rounded()
    with pytest.raises(abqllm.AbqError, match="needs codes"):
        BlockTuning(tune_epochs=1).tune(ctx, inner, {k: v for k, v in result.items() if not k.endswith(".codes")})


def test_norms_stay_fixed_when_asked_or_with_static_activation_ranges():
    ctx, inner, result = _rounded()
    tuned = BlockTuning(tune_epochs=1, tune_norms=False).tune(ctx, inner, result)
    assert tuned and not any(k.startswith(TUNED) for k in tuned)
    ranged = {**result, **{f"{n}.act_range": torch.tensor([-1.0, 1.0]) for n in ctx.linears}}
    tuned = BlockTuning(tune_epochs=1).tune(ctx, inner, ranged)
    assert not any(k.startswith(TUNED) for k in tuned)


@pytest.mark.parametrize("bad, match", [({"tune_epochs": -1}, "tune_epochs"), ({"tune_epochs": 1.5}, "tune_epochs"),
                                        ({"tune_lr": 0}, "tune_lr"), ({"tune_batch": 0}, "tune_batch"),
                                        ({"tune_holdout": 1.0}, "tune_holdout"),
                                        ({"tune_codes_lr": -1e-3}, "tune_codes_lr")])
def test_bad_options_are_clear_errors(bad, match):
    with pytest.raises(abqllm.AbqError, match=match):
        get_method("abq+gptq", **bad)


def test_options_reach_the_composition_and_only_gptq_rounding_takes_them():
    m = get_method("abq+gptq", tune_epochs=2, tune_lr=3e-3)
    assert m.tuning.enabled and m.settings()["tune_epochs"] == 2 and m.settings()["tune_lr"] == 3e-3
    assert "tune_epochs" not in get_method("abq+gptq").settings()  # off: old artifacts keep their keys
    with pytest.raises(abqllm.AbqError, match="unexpected option.*tune_epochs"):
        get_method("awq", tune_epochs=2)  # round-to-nearest: no codes to keep


def test_tuned_preset_is_cpu_large_plus_tuning_for_gptq_compositions_only():
    from abqllm.methods import resolve_preset
    options, data, name = resolve_preset("abq+gptq", "cpu-large-tuned", "cpu")
    base, base_data, _ = resolve_preset("abq+gptq", "cpu-large", "cpu")
    assert name == "cpu-large-tuned" and data == base_data == (64, 256)
    assert options == {**base, "tune_epochs": 4, "tune_lr": 1e-2} and get_method("abq+gptq", **options).tuning.enabled
    with pytest.raises(abqllm.AbqError, match="unknown preset"):
        resolve_preset("abq", "cpu-large-tuned", "cpu")  # plain abq rounds to nearest: nothing to tune


@pytest.mark.parametrize("codes_lr", [0.0, 3e-3])
def test_abq_gptq_with_tuning_quantizes_a_model_end_to_end(codes_lr):
    model, _ = make_tiny_llama()
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    ref_model, _ = make_tiny_llama()
    with torch.no_grad():
        ref = ref_model(ids).logits
    norms_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("norm.weight")}
    abqllm.quantize(model, "W3A16g32", method="abq+gptq", calib_ids=ids, progress=False, epochs=1, batch_size=2,
                    tune_epochs=2, tune_batch=2, tune_codes_lr=codes_lr)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    changed = [n for n, p in model.named_parameters() if n in norms_before and not torch.equal(p, norms_before[n])]
    assert changed  # the tuned norm weights reached the model
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all() and (out - ref).pow(2).mean() < 0.1 * ref.pow(2).mean()


def test_code_tuning_moves_codes_by_at_most_one_level_and_lowers_the_loss():
    positions = {}
    ctx, inner, result = _rounded("W3A16g32", positions=positions)
    for n in ctx.linears:  # GPTQ's codes are its positions rounded and clamped
        assert torch.equal(result[f"{n}.codes"].float(), positions[n].round().clamp(0, ctx.spec.weight.qmax))
    with pytest.raises(abqllm.AbqError, match="rounding positions"):
        BlockTuning(tune_epochs=1, tune_codes_lr=5e-2).tune(ctx, inner, result)
    torch.manual_seed(0)
    tuned = BlockTuning(tune_epochs=4, tune_lr=1e-2, tune_batch=2, tune_codes_lr=3e-3).tune(ctx, inner, result,
                                                                                         positions)
    codes = {k for k in tuned if k.endswith(".codes")}
    assert codes == {f"{n}.codes" for n in ctx.linears}
    moved = 0
    for k in codes:
        step = tuned[k].long() - result[k].long()
        assert tuned[k].dtype == result[k].dtype and step.abs().max() <= 1
        assert tuned[k].min() >= 0 and tuned[k].max() <= ctx.spec.weight.qmax
        moved += int((step != 0).sum())
    assert moved > 0

    torch.manual_seed(0)
    scales_only = BlockTuning(tune_epochs=4, tune_lr=1e-2, tune_batch=2).tune(ctx, inner, result)
    with_codes, scales, untuned = (_block_mse(ctx, inner, {**result, **r}) for r in (tuned, scales_only, {}))
    assert with_codes < scales < untuned  # on the training windows; held out it overfits (README)
    assert BlockTuning(tune_codes_lr=5e-2).settings() == {}  # off while tune_epochs is 0
    assert BlockTuning(tune_epochs=1, tune_codes_lr=5e-2).settings()["tune_codes_lr"] == 5e-2
