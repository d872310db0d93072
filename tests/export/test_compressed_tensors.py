"""Export to compressed-tensors: the library's own decompression gives back exactly abqllm's weights,
transformers runs the export with the same logits, inexpressible schemes are refused, writes are atomic."""
import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("compressed_tensors", reason="pip install 'abqllm[export]'")

import abqllm  # noqa: E402
from abqllm.cli import main  # noqa: E402
from abqllm.export import compressed_tensors as ct_export  # noqa: E402
from abqllm.nn.qlinear import QuantLinear  # noqa: E402
from abqllm.spec import ActSpec, QuantSpec, WeightSpec  # noqa: E402
from tests.tiny import TEXT, make_tiny_llama  # noqa: E402

IDS = torch.tensor([[0, 5, 9, 22, 40, 7, 100, 3, 57, 12]])
# Tiny Llama: hidden 64, intermediate 160 -> groups must divide 64 and 160 (32 does).
CASES = {
    "W4A16g32": (QuantSpec(WeightSpec(4, group_size=32)), "pack-quantized", 4),
    "W3A16-sym": (QuantSpec(WeightSpec(3, symmetric=True)), "pack-quantized", 3),
    "W6A16": (QuantSpec(WeightSpec(6)), "pack-quantized", 6),  # codes straddle int32 words
    "W2*A16g32": (QuantSpec(WeightSpec(2, balanced=True, group_size=32)), "pack-quantized", 3),
    "W1A16": (QuantSpec(WeightSpec(1)), "pack-quantized", 1),
    "W8A8-sym": (QuantSpec(WeightSpec(8, symmetric=True), ActSpec(8)), "int-quantized", 8),
    "W4A8g32": (QuantSpec(WeightSpec(4, group_size=32), ActSpec(8)), "int-quantized", 4),
    "W8A8-static": (QuantSpec(WeightSpec(8, symmetric=True), ActSpec(8, dynamic=False)), "int-quantized", 8),
}


def _checkpoint(root, spec, name="ckpt"):
    model, tok = make_tiny_llama()
    calib = tok(TEXT, return_tensors="pt").input_ids[:, :256].reshape(4, 64)
    abqllm.quantize(model, spec, calib_ids=calib, progress=False)
    return abqllm.save_quantized(model, tok, root / name)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    spec, fmt, bits = CASES[request.param]
    root = tmp_path_factory.mktemp("ct")
    ckpt = _checkpoint(root, spec)
    report = ct_export.export_compressed_tensors(ckpt, root / "ct")
    return ckpt, root / "ct", report, spec, fmt, bits


def test_library_decompresses_to_our_exact_weights(exported):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    ckpt, out, report, spec, fmt, bits = exported
    ours, _ = abqllm.load_quantized(ckpt)
    tensors = load_file(out / "model.safetensors")
    dense = CompressedTensorsDequantizer(out, dtype=torch.float32).process(dict(tensors))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert layers
    for name, m in layers.items():
        # float32 copies of the float16 scales: the library's (q - zp) * s is abqllm's s * (u - z), bit for bit
        assert torch.equal(dense[f"{name}.weight"], m.dequantized_weight()), name
        if hasattr(m, "act_scale"):
            assert torch.equal(tensors[f"{name}.input_scale"], m.act_scale.float())
            assert int(tensors[f"{name}.input_zero_point"]) == int(m.act_zero) - 128
    for name, t in ours.state_dict().items():  # everything not quantized is carried over as is
        if name.rsplit(".", 1)[0] not in layers and name in dense:
            assert torch.equal(dense[name], t), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt == report.formats[0]
    assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert sorted(group["targets"]) == sorted(layers)
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"]) == (bits, "int", spec.weight.symmetric)
    assert w["strategy"] == ("group" if spec.weight.group_size else "channel")
    a = group["input_activations"]
    if spec.act.is_float:
        assert a is None
    else:
        assert (a["num_bits"], a["dynamic"], a["strategy"]) == (8, spec.act.dynamic,
                                                               "token" if spec.act.dynamic else "tensor")


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_transformers_runs_the_export_with_our_logits(exported):
    """transformers' compressed-tensors loader (on CPU) gives abqllm's logits. Asymmetric pack-quantized
    exports load only with dequantize=True here: transformers 5.23 + compressed-tensors 0.20 build an
    unpacked zero-point buffer for them and refuse the packed one the library itself writes."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt, out, _, spec, fmt, _ = exported
    ours, _ = abqllm.load_quantized(ckpt)
    kw = {}
    if fmt == "pack-quantized" and not spec.weight.symmetric:
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    theirs = AutoModelForCausalLM.from_pretrained(out, **kw)
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_the_library_layout(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (37, 100), generator=g, dtype=torch.uint8)  # odd shapes
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(ct_export._pack(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(ct_export._pack(codes.T, bits).T, pack_to_int32(signed, bits, packed_dim=0))


@pytest.mark.parametrize("spec,match", [
    (QuantSpec(WeightSpec(4), ActSpec(4)), "8-bit integer activations"),
    (QuantSpec(WeightSpec(4, group_size=64)), "not a multiple of group size 64"),  # down_proj has 160 columns
])
def test_inexpressible_schemes_refused(tmp_path, spec, match):
    ckpt = _checkpoint(tmp_path, spec)
    with pytest.raises(abqllm.AbqError, match=match):
        ct_export.export_compressed_tensors(ckpt, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written, no temp folder left


def test_missing_library_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    ckpt = _checkpoint(tmp_path, QuantSpec(WeightSpec(4)))
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails as if not installed
    with pytest.raises(abqllm.AbqError, match=r"pip install 'abqllm\[export\]'"):
        ct_export.export_compressed_tensors(ckpt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_float_model_refused(tmp_path):
    make_tiny_llama(tmp_path / "float")
    with pytest.raises(abqllm.AbqError, match="not an abqllm checkpoint"):
        ct_export.export_compressed_tensors(tmp_path / "float", tmp_path / "ct")


def test_interrupted_export_leaves_nothing_and_keeps_the_old_one(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path, QuantSpec(WeightSpec(4, group_size=32)))
    ct_export.export_compressed_tensors(ckpt, tmp_path / "ct")
    before = (tmp_path / "ct" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ct_export, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ct_export.export_compressed_tensors(ckpt, tmp_path / "ct", overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        ct_export.export_compressed_tensors(ckpt, tmp_path / "ct2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ct"]
    assert (tmp_path / "ct" / "model.safetensors").read_bytes() == before


def test_cli_export(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, QuantSpec(WeightSpec(3, symmetric=True)))
    argv = ["export", "--model", str(ckpt), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
            "--json", str(tmp_path / "export.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pack-quantized" in out and "note: int3 symmetric per channel, A16 is outside vLLM" in out
    assert json.loads((tmp_path / "export.json").read_text())["formats"] == ["pack-quantized"]
    assert main(argv[:-2]) == 2  # existing --out without --overwrite
    err = capsys.readouterr().err
    assert err.startswith("error: output folder") and err.count("\n") == 1
