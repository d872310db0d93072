"""RTN baseline on the default model: perplexity, quantize time and checkpoint size per configuration.

    python benchmarks/rtn_table.py                       # all configurations, full evaluation split
    python benchmarks/rtn_table.py --configs W4A8 --max-windows 8

Writes benchmarks/results/rtn_<model>.json and .md. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import abqllm
from abqllm.data.sources import eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity

CONFIGS = "W8A16,W4A16,W4A16g64,W3A16,W3A16g64,W2A16g64,W2*A16,W8A8,W6A6,W4A8,W4A4,W2*A8"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default="out/bench", help="where checkpoints are written (sizes are measured there)")
    a = ap.parse_args()

    text = load_text(None)
    model, tok = abqllm.load_model(a.model)
    ids = eval_token_ids(tok, text)
    fp = perplexity(model, ids, max_windows=a.max_windows)
    rows = [{"config": "float (fp32)", "ppl": fp.ppl, "ratio": 1.0, "quantize_s": 0.0,
             "size_mb": abqllm.model_size_bytes(model) / 2**20, "eval_s": fp.seconds}]
    print(f"float: {fp.ppl:.3f}", flush=True)
    for name in a.configs.split(","):
        model, tok = abqllm.load_model(a.model)
        t0 = time.perf_counter()
        abqllm.quantize(model, name, method=a.method)
        qs = time.perf_counter() - t0
        out = abqllm.save_quantized(model, tok, Path(a.work) / f"{a.method}-{name.replace('*', 's')}", overwrite=True)
        size = (out / "model.safetensors").stat().st_size / 2**20
        r = perplexity(model, ids, max_windows=a.max_windows)
        rows.append({"config": name, "ppl": r.ppl, "ratio": r.ppl / fp.ppl, "quantize_s": qs, "size_mb": size,
                     "eval_s": r.seconds})
        print(f"{name}: {r.ppl:.3f} (x{r.ppl / fp.ppl:.3f}), {qs:.1f} s, {size:.1f} MB", flush=True)

    result = {
        "command": "python " + " ".join(sys.argv), "model": a.model, "method": a.method,
        "data": text.name, "split": text.description, "window": fp.window, "tokens": fp.tokens,
        "windows": fp.windows, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "rows": rows,
    }
    stem = Path(a.out) / f"{a.method}_{a.model}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# {a.method.upper()} on {a.model}", "", f"Command: `{result['command']}`  ", f"Date: {result['date']}, "
             f"{result['machine']}  ", f"Data: {text.name}, evaluation part ({fp.tokens} predicted tokens, "
             f"{fp.windows} windows of {fp.window}); {text.description}", "",
             "| config | perplexity | x float | quantize s | checkpoint MB | eval s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['ppl']:.3f} | {r['ratio']:.3f} | {r['quantize_s']:.1f} | "
                     f"{r['size_mb']:.1f} | {r['eval_s']:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
