"""The lean decode loop on the real default model: greedy tokens equal model.generate's for 64 tokens,
float and packed RTN W4A8 (same linear kernels on both sides, whichever `auto` picks)."""
import pytest
import torch

pytestmark = pytest.mark.realmodel

PROMPT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog and"


def _both(model, tok, n=64):
    from abqllm.runtime.cpu_decode import CpuDecoder

    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)[0, ids.shape[1]:].tolist()
    res = CpuDecoder(model, max_len=ids.shape[1] + n).generate(ids[0], n, ignore_eos=True)
    return res.tokens, ref


@pytest.mark.parametrize("scheme", [None, "W4A8"])
def test_greedy_tokens_equal_hf_generate(default_model_dir, scheme):
    import abqllm

    model, tok = abqllm.load_model("smollm2-135m")
    if scheme:
        abqllm.quantize(model, scheme, method="rtn", progress=False)
    got, ref = _both(model, tok)
    assert len(got) == 64 and got == ref
