"""Probe: the residual stream's largest channels after a block, and the norm weights that read them.
Two calibration windows of 256 tokens. Not part of the test run.

    OMP_NUM_THREADS=1 python benchmarks/massive_channels.py 14
"""
import sys

import torch

import abqllm
from abqllm.data.sources import calibration_samples, load_text

torch.set_num_threads(1)
after = int(sys.argv[1]) if len(sys.argv) > 1 else 14
text = load_text(None)
model, tok = abqllm.load_model("smollm2-135m")
ids = calibration_samples(tok, text, 2, 256, seed=0)
with torch.no_grad():
    hidden = model(ids, output_hidden_states=True).hidden_states[after + 1]  # residual after block `after`
    top, idx = hidden.abs().amax(dim=(0, 1)).topk(3)
    print(f"largest residual channels after block {after}:", idx.tolist(), [round(v, 1) for v in top.tolist()])
    for i in range(after + 1, len(model.model.layers), 5):
        b = model.model.layers[i]
        print(f"block {i}: input norm weight", [round(v, 4) for v in b.input_layernorm.weight[idx].tolist()],
              "post-attention norm weight", [round(v, 5) for v in b.post_attention_layernorm.weight[idx].tolist()])
