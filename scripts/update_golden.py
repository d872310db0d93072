"""Regenerate tests/golden/smollm2-135m.json: the float perplexity the real-model tests must reproduce.

    python scripts/update_golden.py
Run only when the evaluation protocol, the text or the default model changes on purpose.
"""

import json
from pathlib import Path

import abqllm
from abqllm.data.sources import eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity

WINDOWS = 4  # what the default test run evaluates (the full split is a slow test)

text = load_text(None)
model, tok = abqllm.load_model("smollm2-135m")
ids = eval_token_ids(tok, text)
head = perplexity(model, ids, max_windows=WINDOWS)
full = perplexity(model, ids)
golden = {"model": "smollm2-135m", "data": text.name, "window": 1024, "eval_tokens": int(ids.numel()),
          "float_ppl_first_windows": {"windows": WINDOWS, "ppl": head.ppl, "tokens": head.tokens},
          "float_ppl_full": {"windows": full.windows, "ppl": full.ppl, "tokens": full.tokens}}
path = Path(__file__).resolve().parent.parent / "tests/golden/smollm2-135m.json"
path.write_text(json.dumps(golden, indent=2) + "\n")
print(json.dumps(golden, indent=2))
