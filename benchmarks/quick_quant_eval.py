"""Quick development check: quantize the default model with one method and evaluate a few windows.

    OMP_NUM_THREADS=1 python benchmarks/quick_quant_eval.py W4A4 abq "{'epochs':1,'rotate':True}" 16 256 4

Arguments: scheme, method, method options (Python dict literal), calibration windows, tokens per
window, evaluation windows. Prints one RESULT line. Not part of the test run.
"""

import ast
import logging
import sys
import time

import abqllm
from abqllm.data.sources import calibration_samples, eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
scheme, method = sys.argv[1], sys.argv[2]
opts = ast.literal_eval(sys.argv[3]) if len(sys.argv) > 3 else {}
n, length = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (32, 256)
windows = int(sys.argv[6]) if len(sys.argv) > 6 else 4
text = load_text(None)
model, tok = abqllm.load_model("smollm2-135m")
ids = calibration_samples(tok, text, n, length, seed=0)
t0 = time.time()
abqllm.quantize(model, scheme, method=method, calib_ids=ids, **opts)
seconds = time.time() - t0
r = perplexity(model, eval_token_ids(tok, text), max_windows=windows, progress=False)
print(f"RESULT {scheme} {method} {opts} n={n} L={length}: ppl {r.ppl:.3f} over {windows} windows, "
      f"quantize {seconds:.0f}s")
