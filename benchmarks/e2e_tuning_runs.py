"""End-to-end tuning (abq tune) measured on checkpoints made by `abq quantize`: each checkpoint is evaluated as
it is, tuned against the float model on its own calibration windows (the checkpoint's calib_shape and seed),
and evaluated again, on the same window counts in one pass each. Results go into a methods-table cache
(OUT/methods_<model>.json; merge with benchmarks/merge_methods.py) as two rows: LABEL and LABEL + ", e2e EPxLR".
Not part of the test run.

    python benchmarks/e2e_tuning_runs.py --checkpoint /tmp/e2e/w4had_s0 --label "calib 128x256, ..." \
        --quantize-command "abq quantize ..." --epochs 2 --lr 1e-3 --out /tmp/e2e/table_s0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import abqllm
from abqllm.data.sources import calibration_samples, eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity_prefixes
from abqllm.methods.e2e_tuning import E2ETuning, tune_end_to_end


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--label", required=True, help="the row label of the untuned checkpoint, e.g. 'calib 128x256, ...'")
    ap.add_argument("--method", default="abq+gptq")
    ap.add_argument("--quantize-command", required=True, help="the command that made the checkpoint (recorded)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--holdout", type=float, default=0.125)
    ap.add_argument("--windows", default="4,16,all")
    ap.add_argument("--calib", default=None, help="N,L tuning windows (default: the checkpoint's calib_shape)")
    ap.add_argument("--skip-untuned", action="store_true", help="only the tuned row (the untuned one is known)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    counts = [None if w == "all" else int(w) for w in a.windows.split(",")]
    main_count = counts[0]

    model, tok = abqllm.load_model(a.checkpoint)
    qc = model.config.quantization_config
    scheme = abqllm.QuantSpec.from_dict(qc["spec"]).name
    text = load_text(None)
    ids = eval_token_ids(tok, text)
    report_path = Path(f"{a.checkpoint}.report.json")
    qreport = json.loads(report_path.read_text()) if report_path.exists() else {}
    base = {"tokens": None, "quantize_s": qreport.get("quantize_seconds"), "preset": qreport.get("preset"),
            "settings": qc.get("method_settings"), "calib": qc.get("calib_shape"),
            "block_s": [round(b["seconds"], 2) for b in qreport.get("blocks", [])],
            "command": a.quantize_command, "checkpoint": a.checkpoint}
    rows = {}
    if not a.skip_untuned:
        rows[a.label] = (perplexity_prefixes(model, ids, counts), base)

    teacher, _ = abqllm.load_model(a.teacher)
    n, length = [int(v) for v in a.calib.split(",")] if a.calib else qc["calib_shape"]
    seed = int(qc.get("seed") or 0)
    calib = calibration_samples(tok, text, n, length, seed=seed)
    cfg = E2ETuning(epochs=a.epochs, lr=a.lr, holdout=a.holdout)
    t0 = time.perf_counter()
    rep = tune_end_to_end(model, teacher, calib, cfg, seed=seed)
    del teacher
    tuned = {**base, "e2e": rep, "e2e_s": round(time.perf_counter() - t0, 1),
             "command": a.quantize_command + f"  &&  abq tune --model {a.checkpoint} --teacher {a.teacher} "
                        f"--epochs {a.epochs} --lr {a.lr:g} --holdout {a.holdout:g}"
                        + (f" --calib-samples {n} --calib-seqlen {length}" if a.calib else "") + " --out ...  (this script: python "
                        + " ".join(sys.argv) + ")"}
    tuned_label = f"{a.label}, e2e {a.epochs}x{a.lr:g}" + (f" on {n}x{length}" if a.calib else "")
    rows[tuned_label] = (perplexity_prefixes(model, ids, counts), tuned)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"methods_{a.teacher}.json"
    cache = json.loads(path.read_text()) if path.exists() else {"results": {}}
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    known = json.loads((Path(__file__).parent / "results" / f"methods_{a.teacher}.json").read_text())["results"]
    for k, v in known.items():  # the float rows, for merge_methods.py's consistency check
        if k.startswith("float|"):
            cache["results"].setdefault(k, v)
    for label, (scores, res) in rows.items():
        key = f"{a.method} ({label})|{scheme}|w{main_count or 'all'}"
        for w, r in scores.items():
            k = f"{a.method} ({label})|{scheme}|w{w or 'all'}"
            entry = {**res, "ppl": r.ppl, "tokens": r.tokens, "date": date}
            if k != key:
                entry["same_run_as"] = key
            cache["results"][k] = entry
            print(f"{label} {scheme} {w or 'all'} windows: {r.ppl:.3f}", flush=True)
    path.write_text(json.dumps(cache, indent=1))


if __name__ == "__main__":
    main()
