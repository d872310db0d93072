"""Quantize a tiny random Llama through the public API, save, load, same logits."""
import json

import pytest
import torch

import abqllm
from abqllm.nn import QuantLinear
from tests.tiny import make_tiny_llama


@pytest.mark.parametrize("scheme", ["W4A16", "W3A8g32", "W2*A8", "W8A4"])
def test_quantize_save_load_same_logits(tmp_path, scheme):
    model, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        ref_fp = model(ids).logits
    report = abqllm.quantize(model, scheme, progress=False)
    assert report.layers == 2 * 7
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert not isinstance(model.lm_head, QuantLinear)  # skipped by default
    with torch.no_grad():
        ref_q = model(ids).logits
    assert not torch.equal(ref_q, ref_fp)
    out = abqllm.save_quantized(model, tok, tmp_path / "ckpt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    loaded, _ = abqllm.load_model(str(out))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref_q)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "abqllm" and qc["method"] == "rtn" and len(qc["layers"]) == 14


def test_reference_kernel_matches_default_path():
    model, tok = make_tiny_llama()
    abqllm.quantize(model, "W4A8", progress=False)
    ids = torch.randint(0, len(tok), (1, 16))
    with torch.no_grad():
        fast = model(ids).logits
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.kernel = "reference"
        exact = model(ids).logits
    assert torch.allclose(fast, exact, atol=1e-3, rtol=1e-3)


def test_static_activation_needs_and_uses_data():
    model, tok = make_tiny_llama()
    spec = abqllm.QuantSpec(abqllm.WeightSpec(4), abqllm.ActSpec(8, dynamic=False))
    with pytest.raises(abqllm.AbqError, match="calibration data"):
        abqllm.quantize(model, spec, progress=False)
    ids = torch.randint(0, len(tok), (4, 32))
    abqllm.quantize(model, spec, calib_ids=ids, progress=False)
    q = model.model.layers[1].mlp.down_proj
    assert q.act_scale.item() != 1.0


def test_nan_weights_reported():
    model, _ = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(abqllm.AbqError, match=r"layers\.1\.self_attn\.k_proj.*NaN"):
        abqllm.quantize(model, "W4A16", progress=False)


def test_overwrite_refused_and_allowed(tmp_path):
    model, tok = make_tiny_llama()
    abqllm.quantize(model, "W4A16", progress=False)
    out = abqllm.save_quantized(model, tok, tmp_path / "c")
    with pytest.raises(abqllm.AbqError, match="already exists"):
        abqllm.save_quantized(model, tok, out)
    abqllm.save_quantized(model, tok, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_lm_head_quantized_when_not_skipped(tmp_path):
    model, tok = make_tiny_llama()
    spec = abqllm.QuantSpec(abqllm.WeightSpec(8), skip=())
    abqllm.quantize(model, spec, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and not isinstance(model.model.embed_tokens, QuantLinear)
    ids = torch.randint(0, len(tok), (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    loaded, _ = abqllm.load_model(str(abqllm.save_quantized(model, tok, tmp_path / "c")))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
