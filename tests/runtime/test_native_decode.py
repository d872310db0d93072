"""The native C++ decode step (abq_cpu_decode.cpp) against the Python step on tiny random models.

exact mode calls torch's own norm, SDPA and SiLU, so its logits are bit-identical to the Python step's (which
the tests in test_cpu_decode.py hold equal to the Hugging Face forward); fast mode computes those in its own C++
and agrees to float rounding. Also: when the native step is used, why it is not, and its argument checks."""
import pytest
import torch

import abqllm
from abqllm.errors import AbqError
from abqllm.kernels import cpu as cpu_kernels
from abqllm.runtime.cpu_decode import ENGINES, CpuDecoder, decoder_for
from tests.runtime.test_cpu_decode import _tiny

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels not built (no compiler)")


def _teacher_forced(model, ids: torch.Tensor, prompt: int, **kw) -> torch.Tensor:
    dec = CpuDecoder(model, max_len=ids.numel(), **kw)
    assert (dec.native is not None) == (kw.get("native", None) is not False), dec.native_reason
    got = [dec.forward(ids[:prompt])]
    for t in range(prompt, ids.numel()):
        got.append(dec.forward(ids[t:t + 1]))
    return torch.stack(got)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("scheme", [None, "W4A8", "W2*A8", "W3A16g32", "W8A8g64"])
def test_exact_mode_is_bit_identical_to_the_python_step(family, scheme):
    model = _tiny(family)
    if scheme:
        abqllm.quantize(model, scheme, progress=False)
    ids = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(5))
    ref = _teacher_forced(model, ids, 11, native=False)
    got = _teacher_forced(model, ids, 11, native=True, exact=True)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("scheme", [None, "W4A16g32", "W4A8"])
@pytest.mark.parametrize("fuse", [True, False])
def test_fast_mode_agrees_to_float_rounding(family, scheme, fuse):
    model = _tiny(family, seed=1)
    if scheme:
        abqllm.quantize(model, scheme, progress=False)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(6))
    ref = _teacher_forced(model, ids, 9, native=False, fuse=fuse)
    got = _teacher_forced(model, ids, 9, native=True, exact=False, fuse=fuse)
    assert not torch.equal(got[1:], ref[1:]) or scheme is not None  # float: its own arithmetic, not a copy
    # A8: a rounding difference upstream can move an activation code by one step; on these small models that
    # moves logits by far less than the tolerance below, unlike on real models (see test_cpu_decode_real.py).
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 if scheme != "W4A8" else 5e-2)


def test_long_context_uses_parallel_heads_and_stays_close():
    """Past 2^17 / (heads * head_dim) positions the heads run in parallel: same values as one thread."""
    model = _tiny("llama", seed=2)
    ids = torch.randint(0, 300, (240,), generator=torch.Generator().manual_seed(7))
    ref = _teacher_forced(model, ids, 200, native=False)
    got = _teacher_forced(model, ids, 200, native=True, exact=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_falls_back_to_the_python_step_and_says_why():
    model = _tiny("llama")
    abqllm.quantize(model, "W4A16g16", progress=False)  # groups of 16: no cpu kernel, the torch path serves it
    dec = CpuDecoder(model, max_len=32)
    assert dec.native is None and "not a multiple of 32" in dec.native_reason
    with pytest.raises(AbqError, match="native decode step cannot run"):
        CpuDecoder(model, max_len=32, native=True)
    gelu = _tiny("llama")
    gelu.config.hidden_act = "gelu"
    assert "SiLU" in CpuDecoder(gelu, max_len=16).native_reason
    half = _tiny("llama").to(torch.bfloat16)
    assert "float32" in CpuDecoder(half, max_len=16).native_reason
    assert CpuDecoder(_tiny("llama"), max_len=16, native=False).native_reason == "not requested"


def test_engines_and_argument_checks():
    model = _tiny("qwen2")
    assert set(ENGINES) == {"fast", "exact", "python"}
    assert decoder_for(model, "python", 16).native is None
    assert decoder_for(model, "exact", 16).native is not None and decoder_for(model, "fast", 16).native is not None
    with pytest.raises(AbqError, match="unknown CPU engine"):
        decoder_for(model, "turbo", 16)
    dec = decoder_for(model, "fast", 16)
    with pytest.raises(RuntimeError, match="out of range"):
        dec.native.step(300, 0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        dec.native.step(1, 16)
    prompt = torch.arange(3, 12)
    for engine in ("fast", "exact", "python"):  # greedy tokens of a float model: the same on every engine
        assert decoder_for(model, engine, 40).generate(prompt, 20, ignore_eos=True).tokens == \
            decoder_for(model, "python", 40).generate(prompt, 20, ignore_eos=True).tokens


def test_generate_text_accepts_every_engine():
    model = _tiny("llama", seed=3)
    from tests.tiny import make_tiny_llama

    _, tok = make_tiny_llama()
    texts = {e: abqllm.generate_text(model, tok, "The quick brown", max_new_tokens=10, engine=e)
             for e in ("auto", "fast", "exact", "python", "hf")}
    assert len(set(texts.values())) == 1, texts


def test_online_hadamard_layers_run_natively_and_exactly():
    model = _tiny("llama")
    abqllm.quantize(model, "W4A8+had:512", progress=False)
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(3))
    ref = _teacher_forced(model, ids, 11, native=False)
    got = _teacher_forced(model, ids, 11, native=True, exact=True)
    assert torch.equal(got, ref)
