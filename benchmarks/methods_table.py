"""Methods side by side on the default model: one row per method, one column per configuration.

    python benchmarks/methods_table.py --methods rtn,abq --configs W4A16g64,W2*A16 --max-windows 16

Each (method, config) result is cached in benchmarks/results/methods_<model>.json and reused on the
next run (delete an entry to redo it); the markdown table is rebuilt from the cache every time.
A method that does not apply to a configuration (e.g. AWQ with quantized activations) is skipped.
Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import abqllm
from abqllm.calib.memory import peak_mb, reset_peak
from abqllm.data.sources import calibration_samples, eval_token_ids, load_text
from abqllm.errors import AbqError
from abqllm.eval.perplexity import perplexity_prefixes
from abqllm.methods import get_method, resolve_preset
from abqllm.spec import parse_scheme

CONFIGS = "W4A16,W4A16g64,W3A16g64,W2A16g64,W2*A16,W6A6,W4A8,W4A4,W2A8,W2*A8"


def _windows_key(windows: int | None) -> str:
    return f"w{windows or 'all'}"


def run_one(model_name, method, scheme, opts, ids_eval, text, max_windows, seed, calib_size=None, extra_windows=()):
    spec = parse_scheme(scheme)
    options, (n, seqlen), preset = resolve_preset(method, None, "cpu")
    n, seqlen = calib_size or (n, seqlen)
    options.update(opts)
    m = get_method(method, **options)
    model, tok = abqllm.load_model(model_name)
    calib = calibration_samples(tok, text, n, seqlen, seed=seed) if m.needs_data(spec) else None
    reset_peak(torch.device("cpu"))
    t0 = time.perf_counter()
    report = abqllm.quantize(model, spec, method=method, calib_ids=calib, seed=seed, data=text.name, **options)
    qs = time.perf_counter() - t0
    quantize_peak = peak_mb(torch.device("cpu"))
    # the same quantized model on more windows too (one pass): separates evaluation noise from draw noise
    scored = perplexity_prefixes(model, ids_eval, [max_windows, *extra_windows])
    r = scored[max_windows]
    extra = {w: scored[w] for w in extra_windows}
    return {"ppl": r.ppl, "extra_ppl": extra, "tokens": r.tokens, "quantize_s": round(qs, 1), "preset": preset,
            "settings": m.settings(),
            "calib": [n, seqlen] if calib is not None else None,
            "block_s": [round(b.seconds, 2) for b in report.blocks],
            "block_peak_rss_mb": [round(b.peak_mem_mb, 1) for b in report.blocks if b.peak_mem_mb is not None],
            "quantize_peak_rss_mb": round(quantize_peak, 1) if quantize_peak is not None else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rtn,abq")
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--method-opts", default="{}", help="JSON: {method: {option: value}}")
    ap.add_argument("--label", default=None, help="row label suffix, e.g. for an ablation")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", default=None, help="N,L: calibration windows and tokens for every method "
                                                  "(default: each method's own default / cpu preset)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--extra-windows", default="", help="comma-separated window counts (or 'all') to evaluate "
                                                        "the same quantized model on as well (cells in those tables)")
    ap.add_argument("--log", action="store_true", help="INFO log of the calibration (e.g. block tuning's losses)")
    a = ap.parse_args()
    if a.log:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("abqllm.methods.abq").setLevel(logging.WARNING)
    opts_by_method = json.loads(a.method_opts)
    cache_path = Path(a.out) / f"methods_{a.model}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {"results": {}}
    text = load_text(None)
    model, tok = abqllm.load_model(a.model)
    ids = eval_token_ids(tok, text)
    windows_key = _windows_key(a.max_windows)
    extra_windows = [None if w == "all" else int(w) for w in a.extra_windows.split(",") if w]
    missing = [w for w in [a.max_windows, *extra_windows] if f"float|{_windows_key(w)}" not in cache["results"]]
    if missing:
        for w, r in perplexity_prefixes(model, ids, missing).items():
            cache = _merge_write(cache_path, f"float|{_windows_key(w)}", {"ppl": r.ppl})
    del model
    for method in a.methods.split(","):
        label = method + (f" ({a.label})" if a.label else "")
        for scheme in a.configs.split(","):
            key = f"{label}|{scheme}|{windows_key}"
            if cache_path.exists() and key in json.loads(cache_path.read_text())["results"]:
                continue
            try:
                res = run_one(a.model, method, scheme, opts_by_method.get(method, {}), ids, text, a.max_windows, a.seed,
                              tuple(int(v) for v in a.calib.split(",")) if a.calib else None, extra_windows)
            except AbqError as e:
                print(f"skip {label} {scheme}: {e}", flush=True)
                continue
            res["command"] = "python " + " ".join(sys.argv)
            res["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            extra = res.pop("extra_ppl")
            cache = _merge_write(cache_path, key, res)  # other runs may write the same cache meanwhile
            for w, e in extra.items():  # same run, same quantize time; only the evaluation differs
                cache = _merge_write(cache_path, f"{label}|{scheme}|{_windows_key(w)}",
                                     {**res, "ppl": e.ppl, "tokens": e.tokens, "same_run_as": key})
            print(f"{label} {scheme}: ppl {res['ppl']:.3f}, {res['quantize_s']} s", flush=True)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else cache
    cache["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    cache["data"] = {"name": text.name, "split": text.description}
    cache_path.write_text(json.dumps(cache, indent=1))
    write_markdown(cache, cache_path.with_suffix(".md"))


def _merge_write(path: Path, key: str, res: dict) -> dict:
    """Add one result to the cache file as it is on disk now (atomic replace), return the merged cache."""
    cache = json.loads(path.read_text()) if path.exists() else {"results": {}}
    cache["results"][key] = res
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, path)
    return cache


def _row_and_config(key: str) -> tuple[str, str, str]:
    """'abq|W4A4+rot+had:512|w4' -> ('abq +rot+had:512', 'W4A4', 'w4'): spec suffixes (rotations) make rows,
    so each column stays one bit configuration."""
    label, scheme, wk = key.split("|")
    base, plus, suffix = scheme.partition("+")
    return (f"{label} +{suffix}" if plus else label), base, wk


def write_markdown(cache, path: Path):
    res = {_row_and_config(k): v for k, v in cache["results"].items() if not k.startswith("float|")}
    floats = {k.split("|")[1]: v for k, v in cache["results"].items() if k.startswith("float|")}
    lines = ["# Methods on the default model", "", f"Data: {cache.get('data', {}).get('split', '')}  ",
             f"Machine: {cache.get('machine', '')}. Commands and dates are in the JSON beside this file. Rows with "
             "`+rot` / `+had:512`: the residual stream rotated (`--rotate`) / an online Hadamard on each down "
             "projection's input (`--hadamard 512`).", ""]
    for wk in sorted({k[2] for k in res}):
        fp = floats.get(wk, {}).get("ppl")
        rows = sorted({k[0] for k in res if k[2] == wk})
        configs = [c for c in CONFIGS.split(",") if any(k[1] == c for k in res if k[2] == wk)]
        configs += sorted({k[1] for k in res if k[2] == wk} - set(configs))
        windows = "all windows" if wk == "wall" else f"first {wk[1:]} windows"
        lines += [f"## Perplexity ({windows} of 1024 tokens; float {fp:.3f}); in brackets: ratio to float", "",
                  "| method | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
        for r in rows:
            cells = []
            for c in configs:
                e = res.get((r, c, wk))
                cells.append("-" if e is None else f"{e['ppl']:.2f} ({e['ppl'] / fp:.2f})")
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines += ["", "Quantize time (s) on this machine:", "", "| method | " + " | ".join(configs) + " |",
                  "|---|" + "---|" * len(configs)]
        for r in rows:
            cells = [str(res.get((r, c, wk), {}).get("quantize_s", "-")) for c in configs]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
