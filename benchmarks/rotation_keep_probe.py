"""Probe: residual rotation that leaves the model's switched-off (massive-activation) channels unrotated,
RTN, first 4 evaluation windows. Not part of the test run.

    OMP_NUM_THREADS=1 python benchmarks/rotation_keep_probe.py "W4A16+rot" keep   # or: all
"""
import sys, torch, abqllm
from abqllm.data.sources import eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity
from abqllm.methods import rotation
import abqllm.api as api
torch.set_num_threads(1)
keep = sys.argv[2] == "keep"
api.rotate_model = lambda model, seed: rotation.rotate_model(model, seed, keep_switched_off=keep)
text = load_text(None)
model, tok = abqllm.load_model("smollm2-135m")
abqllm.quantize(model, sys.argv[1], method="rtn", progress=False)
print(sys.argv[1:], perplexity(model, eval_token_ids(tok, text), max_windows=4, progress=False).ppl)
