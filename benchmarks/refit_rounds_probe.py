"""What GPTQ's scale refit does round by round, on a synthetic layer (seconds; not part of the test run).

    python benchmarks/refit_rounds_probe.py [--out benchmarks/results/refit_rounds_probe.json]

A random 64 x 256 weight, inputs with a per-channel spread and four outlier channels, W3 g64 with activation
order. Per round: the output error after the refit, after GPTQ re-rounds on the refitted scales, and the
mean ratio of the scales to the min/max scales GPTQ started from.
"""
import argparse
import json

import torch

from abqllm.methods.gptq import gptq_quantize, refit_scales
from abqllm.quant import primitives as P
from abqllm.spec import WeightSpec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/refit_rounds_probe.json")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n, k, gs = 64, 256, 64
    x = torch.randn(4096, k, generator=g) * torch.linspace(0.2, 3, k)
    x[:, :4] *= 20
    w = torch.randn(n, k, generator=g)
    h = 2 * x.T @ x / len(x)
    spec = WeightSpec(3, group_size=gs)

    def err(c, s, z):
        return ((x @ (w - P.dequantize_weight(c, s, z, gs)).T) ** 2).mean().item()

    codes, scale, zero = gptq_quantize(w, h, spec, act_order=True)
    start = scale.clone()
    rows = [{"round": 0, "gptq_error": err(codes, scale, zero), "scale_ratio": 1.0}]
    for r in range(1, a.rounds + 1):
        scale = refit_scales(w, h, codes, scale, zero, gs)
        refit_error = err(codes, scale, zero)
        ratio = (scale / start).mean().item()
        codes, scale, zero = gptq_quantize(w, h, spec, act_order=True, qparams=(scale, zero))
        rows.append({"round": r, "refit_error": refit_error, "gptq_error": err(codes, scale, zero), "scale_ratio": ratio})
    for row in rows:
        print(row)
    with open(a.out, "w") as f:
        json.dump({"command": "python benchmarks/refit_rounds_probe.py", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
