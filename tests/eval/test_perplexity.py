"""perplexity_prefixes: every prefix from one pass equals its own perplexity run, whatever the batch size."""
import math

import pytest
import torch

from abqllm.errors import AbqError
from abqllm.eval.perplexity import perplexity, perplexity_prefixes
from tests.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def model_and_ids():
    model, _ = make_tiny_llama()
    torch.manual_seed(1)
    return model, torch.randint(0, model.config.vocab_size, (7 * 16 + 5,))  # 7 windows of 16 and a dropped tail


@pytest.mark.parametrize("batch_size", [1, 3])
def test_prefixes_match_separate_runs(model_and_ids, batch_size):
    model, ids = model_and_ids
    counts = [2, 5, None, 99]
    got = perplexity_prefixes(model, ids, counts, window=16, batch_size=batch_size, progress=False)
    assert list(got) == counts
    for c in counts:
        alone = perplexity(model, ids, window=16, max_windows=c, batch_size=1, progress=False)
        assert got[c].windows == alone.windows == min(c or 7, 7)
        assert got[c].tokens == alone.tokens == alone.windows * 15
        assert got[c].ppl == pytest.approx(alone.ppl, rel=1e-5)
        assert math.isclose(math.exp(got[c].nll), got[c].ppl, rel_tol=1e-9)
    assert got[2].ppl != pytest.approx(got[None].ppl, rel=1e-3)  # the prefixes really differ


@pytest.mark.parametrize("counts", [[], [0], [2, -1], [True], [1.5]])
def test_bad_counts_are_named(model_and_ids, counts):
    model, ids = model_and_ids
    with pytest.raises(AbqError, match="window counts"):
        perplexity_prefixes(model, ids, counts, window=16, progress=False)
