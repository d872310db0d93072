"""How many kernels a decode step of the e2e benchmark model (benchmarks/gpu/llama.py) launches per layer besides its
linears, with the plain torch layers: every top-level ATen op that computes (views, reshapes and slices launch
nothing on a GPU and are left out), counted with torch.profiler on the CPU. The fused layers (fused_ops.py) launch
5 by construction: add + RMSNorm twice, rope + KV-cache write, silu * up, and the output reshape's copy.

    python benchmarks/gpu/count_layer_ops.py [--out benchmarks/results/llama_layer_ops.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu import llama  # noqa: E402

NO_KERNEL = {"aten::view", "aten::transpose", "aten::unsqueeze", "aten::slice", "aten::select", "aten::reshape",
             "aten::chunk", "aten::split", "aten::expand", "aten::as_strided", "aten::t", "aten::_unsafe_view",
             "aten::alias", "aten::detach"}
LINEAR = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/llama_layer_ops.json")
    args = ap.parse_args()
    layers = 4
    shape = llama.Shape(dim=256, n_layers=layers, n_heads=4, ffn=512, vocab=1000, max_seq=16)
    model = llama.Llama(shape, None, 1, "cpu", fused=False).float()
    for mod in model.modules():  # fp32 buffers: the CPU's fp16 matmuls are slow, the op sequence is the same
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.dtype == torch.float16:
                setattr(mod, name, b.float())
    tok, pos = torch.randint(0, shape.vocab, (1, 1)), torch.tensor([3])
    model(tok, pos)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(tok, pos)
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    whole = collections.Counter(top)
    outside = {"aten::embedding", "aten::index"}  # the model's prologue (embedding, mask and rope rows), once a step
    per_layer = {k: v / layers for k, v in whole.items() if k not in NO_KERNEL | LINEAR | outside}
    result = dict(command="python benchmarks/gpu/count_layer_ops.py", layers_profiled=layers,
                  kernels_per_layer_besides_linears=round(sum(per_layer.values()), 1),
                  linears_per_layer=sum(v for k, v in whole.items() if k in LINEAR) / layers,
                  ops_per_layer=dict(sorted(per_layer.items(), key=lambda kv: -kv[1])),
                  note="the last layer's count includes the final norm and head casts; per layer = total / layers")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
