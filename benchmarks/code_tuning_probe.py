"""Does block tuning of the codes (tune_codes_lr, methods/block_tuning.py) help at the CPU calibration scale?

    OMP_NUM_THREADS=1 python benchmarks/code_tuning_probe.py --blocks 2 --lrs 0,3e-3,1e-2 --out FILE

abq+gptq at W4A16+had:512 on the first blocks of the default model (the rest cut off), 32 x 256 calibration
windows: for each code learning rate (0: scales and norms only), once judged on the training windows
(no hold-out) and once on 8 held-out windows (tune_holdout 0.25). Records each block's tuning loss before
and after and the share of codes moved, from block tuning's log. Writes JSON. Not part of the test run.
"""
import argparse
import json
import logging
import re
import sys
import time
from datetime import datetime, timezone

import abqllm
from abqllm.data.sources import calibration_samples, load_text

LOSS = re.compile(r"block (\d+): tuning loss \((\S+)\) (\S+) -> (\S+), epoch (\d+) of")
MOVED = re.compile(r"block (\d+): (\S+)% of the codes moved")


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run(blocks, n, seqlen, lr, holdout):
    model, tok = abqllm.load_model("smollm2-135m")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    calib = calibration_samples(tok, load_text(None), n, seqlen, seed=0)
    handler = Lines()
    log = logging.getLogger("abqllm.methods.block_tuning")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        abqllm.quantize(model, "W4A16+had:512", method="abq+gptq", calib_ids=calib, seed=0, progress=False,
                        asym=0.25, tune_epochs=4, tune_lr=1e-2, tune_holdout=holdout, tune_codes_lr=lr)
    finally:
        log.removeHandler(handler)
    rows = {}
    for line in handler.lines:
        if m := LOSS.search(line):
            rows[int(m[1])] = {"judged_on": m[2], "before": float(m[3]), "after": float(m[4]), "epoch": int(m[5])}
        elif m := MOVED.search(line):
            rows[int(m[1])]["codes_moved_pct"] = float(m[2])
    return {"tune_codes_lr": lr, "tune_holdout": holdout, "seconds": round(time.perf_counter() - t0, 1),
            "blocks": [rows[b] for b in sorted(rows)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--calib", default="32,256")
    ap.add_argument("--lrs", default="0,3e-3,1e-2")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    n, seqlen = (int(v) for v in a.calib.split(","))
    runs = [run(a.blocks, n, seqlen, float(lr), holdout) for holdout in (0.0, 0.25) for lr in a.lrs.split(",")]
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "scheme": "W4A16+had:512", "method": "abq+gptq (asym 0.25, tune 4x1e-2)", "calib": [n, seqlen],
           "runs": runs}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    for r in runs:
        print(r["tune_codes_lr"], r["tune_holdout"], [(b["before"], b["after"], b.get("codes_moved_pct")) for b in r["blocks"]])


if __name__ == "__main__":
    main()
