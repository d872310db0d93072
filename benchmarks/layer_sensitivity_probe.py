"""Which linears cost the most perplexity at a scheme: quantize one kind of linear at a time with RTN.

    OMP_NUM_THREADS=1 python benchmarks/layer_sensitivity_probe.py W4A16 [--windows 4] [--out FILE]

For each kind (q/k/v/o/gate/up/down), every block's linear of that kind is quantized and the rest stay
float (QuantSpec.skip), then perplexity on the first windows of the default text: one run per kind,
all blocks together. Writes JSON. Not part of the test run.
"""
import argparse
import dataclasses
import json
import time

import abqllm
from abqllm.data.sources import eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity
from abqllm.spec import parse_scheme

KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scheme")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    text = load_text(None)
    base = parse_scheme(a.scheme)
    rows = []
    for kind in [None] + KINDS:
        model, tok = abqllm.load_model("smollm2-135m")
        ids = eval_token_ids(tok, text)
        t0 = time.time()
        if kind is not None:
            skip = tuple(["lm_head"] + [f"*.{k}" for k in KINDS if k != kind])
            abqllm.quantize(model, dataclasses.replace(base, skip=skip), method="rtn", progress=False)
        ppl = perplexity(model, ids, max_windows=a.windows, progress=False).ppl
        rows.append({"quantized": kind or "none (float)", "ppl": ppl, "seconds": round(time.time() - t0, 1)})
        print(rows[-1], flush=True)
    out = a.out or f"benchmarks/results/layer_sensitivity_{a.scheme.replace('*', 's').replace(':', '').replace('+', '_')}.json"
    with open(out, "w") as f:
        json.dump({"command": f"python benchmarks/layer_sensitivity_probe.py {a.scheme} --windows {a.windows}",
                   "scheme": a.scheme, "method": "rtn", "windows": a.windows, "rows": rows}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
