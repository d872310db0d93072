"""Perplexity, with one protocol for float and quantized models.

Protocol: the evaluation text is tokenized once, without special tokens (no BOS), into one token
stream; the stream is cut into consecutive non-overlapping windows of `window` tokens (a shorter
tail is dropped); each window is scored on its own, predicting tokens 2..window from the ones
before (window - 1 predictions per window); perplexity = exp(mean negative log-likelihood over all
predictions). This is the protocol of GPTQ/OmniQuant/ABQ-LLM WikiText-2 numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from abqllm.errors import AbqError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float          # mean negative log-likelihood per predicted token (nats)
    tokens: int         # predicted tokens
    windows: int
    window: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, window: int = 1024, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    return perplexity_prefixes(model, token_ids, [max_windows], window, batch_size, progress)[max_windows]


@torch.no_grad()
def perplexity_prefixes(model, token_ids: torch.Tensor, counts, window: int = 1024, batch_size: int = 1,
                        progress: bool = True) -> dict[int | None, PerplexityResult]:
    """Perplexity on the first n windows for each n in `counts` (None: all windows), from one pass over the
    largest: each window is scored once, so 4, 16 and all windows cost what all windows cost. Keyed by the
    counts as given; each result is the one `perplexity(max_windows=n)` gives."""
    if window < 2:
        raise AbqError(f"window must be at least 2 tokens, got {window}")
    available = token_ids.numel() // window
    if available == 0:
        raise AbqError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {window}; "
                       "use a longer text file or a smaller --window")
    bad = [c for c in counts if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1)]
    if not counts or bad:
        raise AbqError(f"window counts must be whole numbers >= 1 or None (all), got {list(counts)!r}")
    stops = {c: available if c is None else min(c, available) for c in counts}
    n_windows = max(stops.values())
    windows = token_ids[: n_windows * window].reshape(n_windows, window)
    device = next(model.parameters()).device
    total_nll, count, done, at = 0.0, 0, 0, {}
    t0 = time.perf_counter()
    bar = tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress)
    while done < n_windows:
        # a batch never straddles a requested count, so every prefix sum is taken exactly at its window
        end = min([done + batch_size] + [s for s in stops.values() if s > done])
        ids = windows[done:end].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise AbqError("the model produced NaN/inf logits during evaluation; the quantized model is broken "
                           "(try more weight/activation bits)")
        total_nll += nll.item()
        count += ids[:, 1:].numel()
        done = end
        at[done] = (total_nll, count, time.perf_counter() - t0)
        bar.update(ids.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total_nll / count):.3f}")
    bar.close()
    out = {}
    for c, stop in stops.items():
        nll_sum, n_tok, seconds = at[stop]
        out[c] = PerplexityResult(math.exp(nll_sum / n_tok), nll_sum / n_tok, n_tok, stop, window, seconds)
    return out
