"""Probe: W4A4 RTN with a residual rotation and/or an online block-Hadamard on down_proj's input.

    OMP_NUM_THREADS=1 python benchmarks/hadamard_probe.py rothad W4A4   # modes: none, rot, had, rothad

The Hadamard is applied by a forward pre-hook (not a checkpoint feature yet): it measures what an
online rotation of the SwiGLU output would buy before it is built into QuantLinear. First 4 windows.
Not part of the test run.
"""
import sys, time, torch
import abqllm
from abqllm.data.sources import eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity
from abqllm.methods.rotation import rotate_model
from abqllm.models.arch import arch_for, decoder_blocks
from abqllm.nn.qlinear import QuantLinear

def hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5

mode, scheme = sys.argv[1], sys.argv[2]
text = load_text(None)
model, tok = abqllm.load_model("smollm2-135m")
arch = arch_for(model.config)
blk = 512
H = hadamard(blk)
def bd(x):  # block-diagonal Hadamard on the last dim
    s = x.shape
    return (x.reshape(*s[:-1], s[-1] // blk, blk).double() @ H).reshape(s).to(x.dtype)
if "rot" in mode:
    rotate_model(model, 0)
if "had" in mode:
    with torch.no_grad():
        for b in decoder_blocks(model, arch):
            d = b.get_submodule(arch.mlp_down)
            d.weight.data = bd(d.weight.data)  # W H (H symmetric)
abqllm.quantize(model, scheme, method="rtn")
if "had" in mode:
    for b in decoder_blocks(model, arch):
        d = b.get_submodule(arch.mlp_down)
        d.register_forward_pre_hook(lambda m, a: (bd(a[0]),))
r = perplexity(model, eval_token_ids(tok, text), max_windows=4, progress=False)
print("RESULT", mode, scheme, round(r.ppl, 3))
