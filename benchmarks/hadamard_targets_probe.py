"""Probe: the online Hadamard on other linears' inputs than down_proj (RTN, first 4 windows).

    OMP_NUM_THREADS=1 python benchmarks/hadamard_targets_probe.py W4A16 down,o,qkv,gate_up 512

The rotation is installed with quant/hadamard.install on the named linears of every block (block size:
the largest power of two <= the last argument dividing the layer's input), then RTN quantizes; the
runner moves each rotation into its QuantLinear. Not part of the test run.
"""
import sys

import torch

import abqllm
from abqllm.data.sources import eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity
from abqllm.models.arch import arch_for, decoder_blocks
from abqllm.quant import hadamard as H

torch.set_num_threads(1)
scheme, targets, block = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
text = load_text(None)
model, tok = abqllm.load_model("smollm2-135m")
arch = arch_for(model.config)
names = {"down": [arch.mlp_down], "o": [arch.o_proj], "qkv": [arch.q_proj, arch.k_proj, arch.v_proj],
         "gate_up": [n for n in (arch.mlp_gate, arch.mlp_up) if n]}
sizes = {}
for b in decoder_blocks(model, arch):
    for t in targets:
        for n in names[t]:
            sizes[n] = H.install(b.get_submodule(n), block)
abqllm.quantize(model, scheme, method="rtn", progress=False)
r = perplexity(model, eval_token_ids(tok, text), max_windows=4, progress=False)
print("RESULT", scheme, ",".join(targets), block, sizes, round(r.ppl, 3))
