import pytest
import torch

import abqllm
from abqllm.methods.rotation import random_orthogonal, rotate_model
from tests.tiny import make_tiny_llama


def test_random_orthogonal():
    q = random_orthogonal(48, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(48, dtype=q.dtype), atol=1e-10)
    assert torch.equal(q, random_orthogonal(48, seed=3))


def test_rotation_keeps_the_function_and_unties():
    model, tok = make_tiny_llama()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights, so folding is exercised
    ids = torch.randint(0, len(tok), (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        rotate_model(model, seed=0)
        out = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings


def test_rotated_abq_saves_and_loads(tmp_path):
    model, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    abqllm.quantize(model, "W4A4+rot", method="abq", calib_ids=ids, progress=False, epochs=1)
    with torch.no_grad():
        ref = model(ids[:1]).logits
    loaded, _ = abqllm.load_model(str(abqllm.save_quantized(model, tok, tmp_path / "c")))
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]).logits, ref)


def test_rotation_refused_for_gemma():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(abqllm.AbqError, match="rotation"):
        rotate_model(model)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotation_with_online_hadamard_for_any_method(method, tmp_path):
    """+rot and +had together keep a W8A8 model close to float and survive a save/load round trip."""
    model, tok = make_tiny_llama()
    ids = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids[:1]).logits
    abqllm.quantize(model, "W8A8+rot+had:64", method=method, calib_ids=ids, progress=False)
    assert model.config.quantization_config["spec"]["rotate"] is True
    with torch.no_grad():
        out = model(ids[:1]).logits
    assert (out - ref).pow(2).mean().sqrt() < 0.05 * ref.pow(2).mean().sqrt()
    loaded, _ = abqllm.load_model(str(abqllm.save_quantized(model, tok, tmp_path / "c")))
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]).logits, out)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_rotation_keeps_the_function_with_value_biases_and_qk_norms(family):
    """qwen2: v_proj has a bias (rotated with its rows); qwen3: q/k norms (untouched: only v/o rotate per head)."""
    from tests.runtime.test_cpu_decode import _tiny
    model = _tiny(family)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        rotate_model(model, seed=0)
        out = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max(), rtol=1e-4)


def test_switched_off_channels_stay_unrotated():
    from abqllm.methods.rotation import rotation_matrix, switched_off_channels
    from abqllm.models.arch import arch_for
    model, tok = make_tiny_llama()
    with torch.no_grad():
        for b in model.model.layers:
            b.post_attention_layernorm.weight[5] = 1e-5  # channel 5 is read by no MLP
    assert switched_off_channels(model, arch_for(model.config)) == [5]
    q = rotation_matrix(64, 0, [5])
    assert torch.allclose(q @ q.T, torch.eye(64, dtype=q.dtype), atol=1e-10)
    assert q[5, 5] == 1 and q[5].abs().sum() == 1
    ids = torch.randint(0, len(tok), (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        rotate_model(model, keep_switched_off=True)
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)
