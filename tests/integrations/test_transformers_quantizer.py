"""AutoModelForCausalLM.from_pretrained loads abqllm checkpoints: packed in memory, the same logits and
generations as abqllm's own loader, the checkpoint's layer specs and skip list honoured."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import abqllm
from abqllm.nn.qlinear import QuantLinear
from abqllm.spec import ActSpec, QuantSpec, WeightSpec
from tests.tiny import make_tiny_llama

IDS = torch.tensor([[0, 5, 9, 22, 40, 7, 100, 3, 57, 12]])


def _from_pretrained(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="module", params=[
    QuantSpec(WeightSpec(4, group_size=32), ActSpec(8), skip=("lm_head", "*.down_proj")),
    QuantSpec(WeightSpec(2, balanced=True), skip=()),  # lm_head quantized too (untied)
    QuantSpec(WeightSpec(4), ActSpec(4), rotate=True, hadamard=64, hadamard_layers="all"),  # rotated layers
], ids=["W4A8g32-skip-down", "W2*A16-with-lm_head", "W4A4-rot-had-all"])
def ckpt(request, tmp_path_factory):
    model, tok = make_tiny_llama()
    abqllm.quantize(model, request.param, progress=False)
    return abqllm.save_quantized(model, tok, tmp_path_factory.mktemp("hf") / "ckpt")


def _quantized(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_same_layers_specs_logits_and_generation(ckpt):
    ours, _ = abqllm.load_model(str(ckpt))
    hf = _from_pretrained(ckpt)
    layers = json.loads((ckpt / "config.json").read_text())["quantization_config"]["layers"]
    q = _quantized(hf)
    assert set(q) == set(layers) and layers  # exactly the checkpoint's layers; skipped ones stay nn.Linear
    assert all(q[n].spec.to_dict() == d for n, d in layers.items())
    skipped = {n for n, m in hf.named_modules() if isinstance(m, nn.Linear)}
    assert skipped == {n for n, m in ours.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, ours(IDS).logits)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(hf.generate(IDS, **kw), ours.generate(IDS, **kw))


def test_weights_stay_packed(ckpt):
    hf = _from_pretrained(ckpt)
    q = _quantized(hf)
    for name, m in q.items():
        assert m.qweight.dtype == torch.int32 and m.scales.dtype == torch.float16 and m.zeros.dtype == torch.uint8
        full = m.in_features * m.out_features
        floats = [t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point() and t.numel() >= full]
        assert floats == [], name  # no dense float weight anywhere in the layer
        assert m.qweight.shape == (m.out_features, -(-m.in_features // 32) * m.spec.weight.storage_bits)
    # What is held is what the checkpoint stores (tied embeddings counted once).
    assert abqllm.model_size_bytes(hf) == abqllm.model_size_bytes(abqllm.load_model(str(ckpt))[0])


def test_damaged_checkpoint_refused(ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(abqllm.AbqError, match="sha256"):
        _from_pretrained(bad)


def test_registration_is_lazy_and_works_in_a_fresh_process(tmp_path):
    # `import abqllm` must not import transformers' quantizer registry (seconds); from_pretrained,
    # which imports it, must still find the abqllm quantizer.
    model, tok = make_tiny_llama()
    abqllm.quantize(model, "W4A16", progress=False)
    ckpt = abqllm.save_quantized(model, tok, tmp_path / "ckpt")
    code = ("import sys, abqllm\n"
            "assert 'transformers.quantizers.auto' not in sys.modules, 'registry imported eagerly'\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
            "from abqllm.nn.qlinear import QuantLinear\n"
            "print(sum(isinstance(x, QuantLinear) for x in m.modules()))\n")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    layers = json.loads((ckpt / "config.json").read_text())["quantization_config"]["layers"]
    assert int(r.stdout.split()[-1]) == len(layers)


@pytest.mark.realmodel
def test_smollm2_w4a16_rtn(default_model_dir, tmp_path):
    model, tok = abqllm.load_model("smollm2-135m")
    abqllm.quantize(model, "W4A16", progress=False)
    ckpt = abqllm.save_quantized(model, tok, tmp_path / "w4a16")
    del model
    ours, _ = abqllm.load_model(str(ckpt))
    hf = _from_pretrained(ckpt)
    q = _quantized(hf)
    assert len(q) == 30 * 7 and all(m.qweight.dtype == torch.int32 for m in q.values())
    assert not any(p.numel() >= m.in_features * m.out_features for m in q.values() for p in m.parameters())
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids).logits)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    out = hf.generate(ids, **kw)
    assert torch.equal(out, ours.generate(ids, **kw)) and out.shape[1] == ids.shape[1] + 8
