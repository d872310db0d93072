"""End-to-end tuning (methods/e2e_tuning.py): codes fixed, scales and norms trained against the float model."""
import copy
import dataclasses

import pytest
import torch

import abqllm
from abqllm.methods.e2e_tuning import E2ETuning, _kl, _TunableLinear, tune_end_to_end
from abqllm.nn.qlinear import QuantLinear
from tests.tiny import make_tiny_llama


def _pair(scheme="W2A16", seed=0):
    """(float teacher, RTN-quantized copy) of a tiny random Llama."""
    teacher, _ = make_tiny_llama(seed=seed)
    model = copy.deepcopy(teacher)
    abqllm.quantize(model, scheme, method="rtn", progress=False)
    return teacher, model


def _windows(n=16, length=32, vocab=300, seed=1):
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _kl_on(model, teacher, ids):
    return _kl(model(ids).logits, teacher(ids).logits).item()


@pytest.mark.parametrize("scheme", ["W2A16", "W3A8g32", "W4A16"])
def test_tuning_lowers_the_held_out_kl_and_keeps_the_codes(scheme):
    teacher, model = _pair(scheme)
    ids = _windows()
    before = _state(model)
    report = tune_end_to_end(model, teacher, ids, E2ETuning(epochs=3, lr=1e-2, batch=4, holdout=0.25), progress=False)
    assert report["kl_after"] < report["kl_before"] and report["epoch_kept"] >= 1
    after = _state(model)
    qweights = [k for k in after if k.endswith(".qweight") or k.endswith(".zeros")]
    assert qweights and all(torch.equal(after[k], before[k]) for k in qweights)
    scales = [k for k in after if k.endswith(".scales")]
    assert any(not torch.equal(after[k], before[k]) for k in scales)
    assert all(after[k].dtype == torch.float16 for k in scales)
    norms = [k for k in after if "norm" in k]
    assert any(not torch.equal(after[k], before[k]) for k in norms)
    assert model.config.quantization_config["e2e_tuning"]["epoch_kept"] == report["epoch_kept"]
    # what was judged is what the QuantLinear kernels compute from the stored (fp16) scales
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    judged = ids[order[: report["held_out_windows"]]]
    assert _kl_on(model, teacher, judged) == pytest.approx(report["kl_after"], rel=1e-3)
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("proj"))
    assert not any(p.requires_grad is False for p in model.parameters())  # flags as they were


def test_a_harmful_step_keeps_the_untouched_model():
    teacher, model = _pair("W4A16")
    ids = _windows()
    before = _state(model)
    report = tune_end_to_end(model, teacher, ids, E2ETuning(epochs=1, lr=3.0, holdout=0.25), progress=False)
    assert report["epoch_kept"] == 0 and report["kl_curve"][1] > report["kl_curve"][0]
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("scheme,had", [("W4A8g32", 0), ("W3A16", 0), ("W4A16", 32), ("W2*A4g32", 32)])
def test_tunable_linear_computes_what_the_quantlinear_does(scheme, had):
    lin = torch.nn.Linear(96, 40, bias=True)
    spec = dataclasses.replace(abqllm.parse_scheme(scheme).layer, hadamard=had)
    q = QuantLinear.from_float(lin, spec)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(_TunableLinear(q)(x), q(x), rtol=1e-4, atol=1e-4)


def test_static_activation_ranges_keep_the_norms():
    teacher, _ = make_tiny_llama()
    model = copy.deepcopy(teacher)
    ids = _windows()
    abqllm.quantize(model, abqllm.QuantSpec(abqllm.WeightSpec(3), abqllm.ActSpec(8, dynamic=False)), method="rtn",
                    calib_ids=ids[:4], progress=False)
    before = _state(model)
    tune_end_to_end(model, teacher, ids, E2ETuning(epochs=2, lr=1e-2, holdout=0.25), progress=False)
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in after if "norm" in k)


def test_refusals():
    teacher, model = _pair("W4A16")
    with pytest.raises(abqllm.AbqError, match="no QuantLinear"):
        tune_end_to_end(copy.deepcopy(teacher), teacher, _windows(), progress=False)
    with pytest.raises(abqllm.AbqError, match="at least 2"):
        tune_end_to_end(model, teacher, _windows(n=1), progress=False)
    other, _ = make_tiny_llama()
    other.config.vocab_size = 999
    with pytest.raises(abqllm.AbqError, match="vocabulary"):
        tune_end_to_end(model, other, _windows(), progress=False)
    for bad in ({"epochs": 0}, {"lr": -1.0}, {"batch": 0}, {"holdout": 1.0}, {"epochs": True}):
        with pytest.raises(abqllm.AbqError):
            E2ETuning(**bad)
