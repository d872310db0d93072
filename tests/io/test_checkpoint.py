"""Damaged checkpoints are refused with a clear message; writes are atomic."""
import json

import pytest
import torch

import abqllm
from abqllm.io import checkpoint
from tests.tiny import make_tiny_llama


@pytest.fixture
def ckpt(tmp_path):
    model, tok = make_tiny_llama()
    abqllm.quantize(model, "W4A8", progress=False)
    return abqllm.save_quantized(model, tok, tmp_path / "ckpt")


def test_truncated_weights_refused(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(abqllm.AbqError, match="truncated"):
        abqllm.load_quantized(ckpt)


def test_edited_weights_refused(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(abqllm.AbqError, match="sha256"):
        abqllm.load_quantized(ckpt)


def test_edited_config_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(abqllm.AbqError, match="format version"):
        abqllm.load_quantized(ckpt)


def test_layer_spec_edit_is_caught(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    name = next(iter(cfg["quantization_config"]["layers"]))
    cfg["quantization_config"]["layers"][name]["weight"]["bits"] = 3  # tensors were packed at 4 bits
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(abqllm.AbqError, match="shape"):
        abqllm.load_quantized(ckpt)


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(abqllm.AbqError, match="missing"):
        abqllm.load_quantized(ckpt)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model, tok = make_tiny_llama()
    abqllm.quantize(model, "W4A16", progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "sha256_file", boom)  # dies after the tensors were written
    with pytest.raises(KeyboardInterrupt):
        abqllm.save_quantized(model, tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_checkpoint(ckpt, monkeypatch):
    model, tok = make_tiny_llama(seed=1)
    abqllm.quantize(model, "W4A16", progress=False)
    before = (ckpt / "model.safetensors").read_bytes()
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        abqllm.save_quantized(model, tok, ckpt, overwrite=True)
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]


def test_float_model_is_not_saved_as_quantized(tmp_path):
    model, tok = make_tiny_llama()
    with pytest.raises(abqllm.AbqError, match="not quantized"):
        abqllm.save_quantized(model, tok, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_packed_tensors_are_small(ckpt):
    from safetensors import safe_open

    with safe_open(ckpt / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.up_proj.qweight")
    assert q.dtype == torch.int32 and q.shape == (160, 64 // 32 * 4)
