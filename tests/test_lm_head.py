"""The output layer (lm_head) with its own scheme: QuantSpec.lm_head, abqllm.quantize, checkpoints (abqllm and
transformers loaders), `abq quantize --lm-head`, `abq bench cpu --configs W4A8+head8`; on tiny random Llamas.
The real-model perplexity check is in tests/test_real_model.py."""
import json

import pytest
import torch

import abqllm
from abqllm.cli import main
from abqllm.nn import QuantLinear
from abqllm.runtime.bench import parse_configs
from abqllm.spec import ActSpec, LayerSpec, QuantSpec, WeightSpec, parse_scheme
from tests.tiny import make_tiny_llama

W8A8 = LayerSpec(WeightSpec(8), ActSpec(8))
W8A16 = LayerSpec(WeightSpec(8))


# ----------------------------------------------------------------------------- spec

def test_spec_round_trip_and_name():
    spec = QuantSpec(WeightSpec(4), ActSpec(8), lm_head=W8A8)
    assert spec.name == "W4A8+head:W8A8"
    assert spec.to_dict()["lm_head"] == W8A8.to_dict()
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert parse_scheme(spec.name) == spec  # the name reads back
    assert parse_scheme("w4a16g64+HEAD:w8a16").lm_head == W8A16
    assert QuantSpec(WeightSpec(4), lm_head="W6A16g32").lm_head == LayerSpec(WeightSpec(6, group_size=32))
    assert spec.head_layer() == W8A8  # wins over the default skip
    assert QuantSpec(WeightSpec(4), ActSpec(8)).head_layer() is None
    assert QuantSpec(WeightSpec(4), ActSpec(8), skip=()).head_layer() == LayerSpec(WeightSpec(4), ActSpec(8))


def test_old_spec_dicts_load_and_head_less_dicts_are_unchanged():
    old = {"version": 1, "weight": {"bits": 4, "balanced": False, "group_size": 0, "symmetric": False},
           "act": {"bits": 8, "symmetric": False, "dynamic": True}, "skip": ["lm_head"], "kv_bits": 16}
    spec = QuantSpec.from_dict(old)
    assert spec.lm_head is None and spec.name == "W4A8"
    assert spec.to_dict() == old  # no new key: cached sweep cells and bench checkpoints stay valid


@pytest.mark.parametrize("make,msg", [
    (lambda: QuantSpec(WeightSpec(4), lm_head=LayerSpec(WeightSpec(8), ActSpec(8, dynamic=False))),
     "static activation scales are not supported for lm_head"),
    (lambda: QuantSpec(WeightSpec(4), lm_head="W9A8"), "weight bits must be in 1..8"),
    (lambda: QuantSpec(WeightSpec(4), lm_head="W8A1"), "activation bits"),
    (lambda: QuantSpec(WeightSpec(4), lm_head="eight"), "cannot read lm_head scheme"),
    (lambda: QuantSpec(WeightSpec(4), lm_head=8), "lm_head must be a LayerSpec"),
    (lambda: parse_scheme("W4A8+head:"), "cannot read lm_head scheme"),
    (lambda: parse_scheme("W4A8+head:W8A8+head:W8A8"), "cannot read lm_head scheme"),
    (lambda: QuantSpec.from_dict({**QuantSpec(WeightSpec(4)).to_dict(), "lm_head": {"weight": {}}}),
     "malformed layer spec"),
    (lambda: QuantSpec.from_dict({**QuantSpec(WeightSpec(4)).to_dict(), "lm_head": "W8A8"}), "malformed lm_head"),
])
def test_spec_refusals(make, msg):
    with pytest.raises(abqllm.AbqError, match=msg):
        make()


# ----------------------------------------------------------------------------- quantize, save, load

def _bits(module):
    return (module.spec.weight.bits, module.spec.act.bits)


def test_quantize_head_scheme_save_load_identical_logits(tmp_path):
    model, tok = make_tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    spec = QuantSpec(WeightSpec(4), ActSpec(8), lm_head=W8A8)  # lm_head stays in the default skip: head wins
    report = abqllm.quantize(model, spec, progress=False)
    assert report.spec == "W4A8+head:W8A8" and report.layers == 2 * 7 + 1
    assert isinstance(model.lm_head, QuantLinear) and _bits(model.lm_head) == (8, 8)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)  # untied, float
    body = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"]
    assert len(body) == 14 and all(_bits(m) == (4, 8) for m in body)
    qc = model.config.quantization_config
    assert qc["layers"]["lm_head"] == W8A8.to_dict()
    assert qc["layers"]["model.layers.0.mlp.down_proj"] == LayerSpec(WeightSpec(4), ActSpec(8)).to_dict()
    assert QuantSpec.from_dict(qc["spec"]) == spec
    ids = torch.randint(0, len(tok), (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    out = abqllm.save_quantized(model, tok, tmp_path / "c")
    loaded, _ = abqllm.load_model(str(out))
    assert isinstance(loaded.lm_head, QuantLinear) and _bits(loaded.lm_head) == (8, 8)
    assert _bits(loaded.model.layers[1].self_attn.o_proj) == (4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)

    from transformers import AutoModelForCausalLM

    from abqllm import integrations  # noqa: F401  (registers quant_method "abqllm")

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf.lm_head, QuantLinear) and _bits(hf.lm_head) == (8, 8)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref)


def test_head_scheme_independent_of_body():
    """A weight-only head under a W4A8 body, and an 8-bit head scheme differs from quantizing it at 4 bits."""
    ids = torch.randint(0, 100, (1, 16))
    logits = {}
    for name, spec in [("head8", QuantSpec(WeightSpec(4), ActSpec(8), lm_head=W8A16)),
                       ("same", QuantSpec(WeightSpec(4), ActSpec(8), skip=()))]:
        model, _ = make_tiny_llama()
        abqllm.quantize(model, spec, progress=False)
        logits[name] = model(ids).logits.detach()
        assert isinstance(model.lm_head, QuantLinear)
        assert _bits(model.lm_head) == ((8, 16) if name == "head8" else (4, 8))
    assert not torch.equal(logits["head8"], logits["same"])


def test_static_body_with_head_scheme_and_early_refusal():
    model, tok = make_tiny_llama()
    calib = torch.randint(0, len(tok), (2, 16))
    spec = QuantSpec(WeightSpec(8), ActSpec(8, dynamic=False), lm_head=W8A8)  # the head's own scheme is dynamic
    abqllm.quantize(model, spec, calib_ids=calib, progress=False)
    assert model.lm_head.spec.act.dynamic and not model.model.layers[0].mlp.up_proj.spec.act.dynamic
    model, _ = make_tiny_llama()
    with pytest.raises(abqllm.AbqError, match="static activation scales are not supported for lm_head"):
        abqllm.quantize(model, QuantSpec(WeightSpec(8), ActSpec(8, dynamic=False), skip=()), calib_ids=calib,
                        progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before any layer was touched


def test_block_calibration_artifacts_reapplied_under_another_head(tmp_path):
    """The head is RTN after the blocks: a calibration kept in --artifacts serves any head scheme."""
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    first, _ = make_tiny_llama()
    abqllm.quantize(first, "W3A16", method="gptq", calib_ids=ids, progress=False, artifacts=tmp_path / "art")
    again, _ = make_tiny_llama()
    abqllm.quantize(again, "W3A16+head:W8A16", method="gptq", calib_ids=ids, progress=False,
                    artifacts=tmp_path / "art")
    assert _bits(again.lm_head) == (8, 16)
    for name, m in first.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.qweight, again.get_submodule(name).qweight), name


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_head")
    make_tiny_llama(root / "model")
    return root


def _quantize(capsys, tiny, out, *extra):
    code = main(["quantize", "--model", str(tiny / "model"), "--wbits", "4", "--abits", "8", "--out", str(out),
                 *extra])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_lm_head_flag(tiny, capsys):
    code, out, err = _quantize(capsys, tiny, tiny / "h8", "--lm-head", "W8A8", "--json", str(tiny / "h8.json"))
    assert code == 0, err
    assert "W4A8+head:W8A8" in out and json.loads((tiny / "h8.json").read_text())["layers"] == 15
    qc = json.loads((tiny / "h8" / "config.json").read_text())["quantization_config"]
    assert qc["layers"]["lm_head"] == W8A8.to_dict() and qc["spec"]["lm_head"] == W8A8.to_dict()
    model, _ = abqllm.load_model(str(tiny / "h8"))
    assert _bits(model.lm_head) == (8, 8)
    # --lm-head float keeps it float even with --skip ''; not giving it keeps today's behaviour.
    for extra, quantized in [(["--lm-head", "float", "--skip", ""], False), (["--skip", ""], True), ([], False)]:
        code, _, err = _quantize(capsys, tiny, tiny / "x", "--overwrite", *extra)
        assert code == 0, err
        qc = json.loads((tiny / "x" / "config.json").read_text())["quantization_config"]
        assert ("lm_head" in qc["layers"]) == quantized and "lm_head" not in qc["spec"], extra


@pytest.mark.parametrize("args,msg", [
    (["--lm-head", "W9A8"], "--lm-head 'W9A8': weight bits must be in 1..8"),
    (["--lm-head", "W8A1"], "activation bits"),
    (["--lm-head", "eight"], "cannot read --lm-head 'eight'"),
    (["--lm-head", ""], "--lm-head is empty"),
    (["--lm-head", "W4A8+head:W8A8"], "cannot read --lm-head"),
    (["--abits", "8", "--act-static", "--skip", ""], "static activation scales are not supported for lm_head"),
])
def test_cli_lm_head_bad_input(tiny, capsys, args, msg):
    out = tiny / "bad"
    code, _, err = _quantize(capsys, tiny, out, *args)
    assert code == 2 and msg in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tiny.glob(".bad*"))  # nothing written


# ----------------------------------------------------------------------------- abq bench cpu --configs

def test_bench_head_configs():
    cfgs = {c["name"]: c.get("spec") for c in parse_configs(
        "float,W4A8,W4A8+head8,W4A16g64+head8,W4A4+head6,W4A8+lm_head,W4A8+head:W8A16")}
    assert cfgs["float"] is None
    assert cfgs["W4A8"].head_layer() is None
    assert cfgs["W4A8+head8"] == parse_scheme("W4A8+head:W8A8")  # 8-bit per-token activations under an A8 body
    assert cfgs["W4A16g64+head8"].lm_head == W8A16  # weight-only under an A16 body
    assert cfgs["W4A4+head6"].lm_head == LayerSpec(WeightSpec(6), ActSpec(8))
    assert cfgs["W4A8+lm_head"].skip == () and cfgs["W4A8+lm_head"].lm_head is None  # the body's scheme
    assert cfgs["W4A8+head:W8A16"].lm_head == W8A16


@pytest.mark.parametrize("text,msg", [
    ("W4A8+head9", "lm_head weight bits must be in 1..8"),
    ("W4A8+head0", "lm_head weight bits"),
    ("W4A8+headx", "cannot read scheme"),
    ("W4A8+head:W8A8+head8", "two schemes"),
    ("W4A8+head:W8A8+lm_head", "two schemes"),
])
def test_bench_head_configs_bad(text, msg):
    with pytest.raises(abqllm.AbqError, match=msg):
        parse_configs(text)
