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
    if window < 2:
        raise AbqError(f"window must be at least 2 tokens, got {window}")
    n_windows = token_ids.numel() // window
    if n_windows == 0:
        raise AbqError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {window}; "
                       "use a longer text file or a smaller --window")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = token_ids[: n_windows * window].reshape(n_windows, window)
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress)
    for i in range(0, n_windows, batch_size):
        ids = windows[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise AbqError("the model produced NaN/inf logits during evaluation; the quantized model is broken "
                           "(try more weight/activation bits)")
        total_nll += nll.item()
        count += ids[:, 1:].numel()
        bar.update(ids.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total_nll / count):.3f}")
    bar.close()
    mean = total_nll / count
    return PerplexityResult(math.exp(mean), mean, count, n_windows, window, time.perf_counter() - t0)
