"""Regenerate tests/golden/smollm2-135m.json: the perplexities the real-model tests must reproduce.

    python scripts/update_golden.py            # float (first windows and the full split)
    python scripts/update_golden.py quantized  # RTN W4A16g64, RTN W4A4+had:512, ABQ W4A16 (cpu preset)
    python scripts/update_golden.py quantized rtn_W4A4had512   # only the named entries
Run only when the evaluation protocol, the text, the default model or a method changes on purpose.
Each part replaces only its own entries.
"""

import json
import sys
import time
from pathlib import Path

import torch

import abqllm
from abqllm.data.sources import calibration_samples, eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity
from abqllm.methods import resolve_preset

WINDOWS = 4  # what the default test run evaluates (the full split is a slow test)
# (name, scheme, method): the quantized results the golden checks reproduce
QUANTIZED = [("rtn_W4A16g64", "W4A16g64", "rtn"), ("rtn_W4A4had512", "W4A4+had:512", "rtn"),
             ("abq_W4A16_cpu", "W4A16", "abq")]

path = Path(__file__).resolve().parent.parent / "tests/golden/smollm2-135m.json"
golden = json.loads(path.read_text()) if path.exists() else {}
text = load_text(None)
model, tok = abqllm.load_model("smollm2-135m")
ids = eval_token_ids(tok, text)
if sys.argv[1:2] == ["quantized"]:
    only = set(sys.argv[2:])
    for name, scheme, method in QUANTIZED:
        if only and name not in only:
            continue
        options, (n, seqlen), preset = resolve_preset(method, None, "cpu")
        q, _ = abqllm.load_model("smollm2-135m")
        calib = calibration_samples(tok, text, n, seqlen, seed=0) if method != "rtn" else None
        t0 = time.perf_counter()
        abqllm.quantize(q, scheme, method=method, calib_ids=calib, seed=0, **options)
        r = perplexity(q, ids, max_windows=WINDOWS)
        golden.setdefault("quantized", {})[name] = {
            "scheme": scheme, "method": method, "preset": preset, "options": options,
            "calib": [n, seqlen] if calib is not None else None, "seed": 0,
            "windows": WINDOWS, "ppl": r.ppl, "quantize_s": round(time.perf_counter() - t0, 1),
            "source": f"python scripts/update_golden.py {' '.join(sys.argv[1:])}, {time.strftime('%Y-%m-%d')} "
                      f"({torch.get_num_threads()} threads)"}
else:
    head = perplexity(model, ids, max_windows=WINDOWS)
    full = perplexity(model, ids)
    golden.update({"model": "smollm2-135m", "data": text.name, "window": 1024, "eval_tokens": int(ids.numel()),
                   "float_ppl_first_windows": {"windows": WINDOWS, "ppl": head.ppl, "tokens": head.tokens},
                   "float_ppl_full": {"windows": full.windows, "ppl": full.ppl, "tokens": full.tokens}})
path.write_text(json.dumps(golden, indent=2) + "\n")
print(json.dumps(golden, indent=2))
