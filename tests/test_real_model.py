"""The real default model (SmolLM2-135M) on the default text: the float perplexity is reproduced and
W8A16 RTN stays within 1% of it. Golden values: tests/golden/smollm2-135m.json (scripts/update_golden.py)."""
import json
from pathlib import Path

import pytest

GOLDEN = json.loads((Path(__file__).parent / "golden/smollm2-135m.json").read_text())
pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def setup(default_model_dir):
    import abqllm
    from abqllm.data.sources import eval_token_ids, load_text

    model, tok = abqllm.load_model("smollm2-135m")
    return model, tok, eval_token_ids(tok, load_text(None))


def _ppl(model, ids, windows):
    from abqllm.eval.perplexity import perplexity

    return perplexity(model, ids, max_windows=windows, progress=False)


def test_eval_split_is_the_recorded_one(setup):
    _, _, ids = setup
    assert ids.numel() == GOLDEN["eval_tokens"]


def test_float_ppl_and_w8a16_within_one_percent(setup):
    import abqllm

    model, tok, ids = setup
    g = GOLDEN["float_ppl_first_windows"]
    fp = _ppl(model, ids, g["windows"])
    assert fp.tokens == g["tokens"]
    assert fp.ppl == pytest.approx(g["ppl"], rel=2e-3)
    q, _ = abqllm.load_model("smollm2-135m")
    abqllm.quantize(q, "W8A16", progress=False)
    w8 = _ppl(q, ids, g["windows"])
    assert fp.ppl <= w8.ppl * 1.002 and w8.ppl <= fp.ppl * 1.01


def test_generation_is_sensible(setup):
    import abqllm

    model, tok, _ = setup
    assert "Paris" in abqllm.generate_text(model, tok, "The capital of France is", max_new_tokens=8)


@pytest.mark.slow
def test_full_split_float_ppl(setup):
    model, _, ids = setup
    g = GOLDEN["float_ppl_full"]
    assert _ppl(model, ids, None).ppl == pytest.approx(g["ppl"], rel=2e-3)


def _golden_quantized(name, setup):
    import abqllm
    from abqllm.data.sources import calibration_samples, load_text

    g = GOLDEN["quantized"][name]
    model, tok, ids = setup
    q, _ = abqllm.load_model("smollm2-135m")
    calib = calibration_samples(tok, load_text(None), *g["calib"], seed=g["seed"]) if g["calib"] else None
    abqllm.quantize(q, g["scheme"], method=g["method"], calib_ids=calib, seed=g["seed"], progress=False,
                    **g["options"])
    return _ppl(q, ids, g["windows"]).ppl, g["ppl"]


def test_rtn_w4a16g64_reproduces_golden(setup):
    got, want = _golden_quantized("rtn_W4A16g64", setup)
    assert got == pytest.approx(want, rel=2e-3)


def test_rtn_w4a4_online_hadamard_reproduces_golden(setup):
    """W4A4 RTN is fragile (float rounding in the rotation moved it 539 -> 514 when the CPU transform
    changed), so 5%; the point is the level: plain W4A4 RTN is 1110.9 on these windows."""
    got, want = _golden_quantized("rtn_W4A4had512", setup)
    assert got == pytest.approx(want, rel=0.05)


@pytest.mark.slow
def test_abq_w4a16_cpu_preset_reproduces_golden(setup):
    """ABQ's training is seeded per block; thread counts can still move float sums a little."""
    got, want = _golden_quantized("abq_W4A16_cpu", setup)
    assert got == pytest.approx(want, rel=0.02)


def test_rtn_w4a8_with_w8a8_head_close_to_float_head(setup):
    """An 8-bit output layer costs little where a 4-bit one costs a lot. On the first 4 windows, one thread,
    `auto` kernels: W4A8 RTN with a float head 35.886, with --lm-head W8A8 36.019 (+0.4%), with --lm-head
    W8A16 35.903, with the head at the body's W4A8 (--skip '') 47.093, from
    abq quantize --model smollm2-135m --wbits 4 --abits 8 --method rtn [--lm-head W8A8 | ...] --out DIR
    abq eval --model DIR --max-windows 4"""
    import abqllm
    from abqllm.nn import QuantLinear

    _, _, ids = setup
    ppl = {}
    for scheme in ("W4A8", "W4A8+head:W8A8"):
        q, _ = abqllm.load_model("smollm2-135m")
        abqllm.quantize(q, scheme, progress=False)
        assert isinstance(q.lm_head, QuantLinear) == (scheme != "W4A8")
        ppl[scheme] = _ppl(q, ids, 4).ppl
        del q
    assert ppl["W4A8"] * 0.98 <= ppl["W4A8+head:W8A8"] <= ppl["W4A8"] * 1.02, ppl
