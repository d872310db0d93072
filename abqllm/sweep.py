"""Trade-off sweep: quantize a model at several schemes, evaluate each, tabulate and plot ppl against size.

    from abqllm.sweep import SweepSettings, run_sweep
    result = run_sweep(SweepSettings(model="smollm2-135m", configs=("W8A8", "W4A16"), method="rtn",
                                     max_windows=16, out="out/sweep"))

Every cell (the float model, each scheme) is cached as one JSON file in OUT/cells/, named after a
digest of everything its number depends on: model, scheme, method, preset and the method's full
settings, calibration windows and seed (when the method uses data), the text (name and sha256) and
the evaluation window and window count. Rerunning skips every cell whose file exists; change any of
those and the cell is computed again. The table (sweep.csv, sweep.json, sweep.md) and the picture
(sweep.png) are rebuilt from the cells of the current settings on every run.

Bits per weight are measured, not computed from the name: the bytes of every tensor a quantized
linear layer keeps in the saved checkpoint (packed codes, fp16 scales, uint8 zero points, padding
to 32 columns) divided by that layer's weight count, over all quantized layers. The float model
counts its linear weights' dtype (32 for fp32). Size MB is the checkpoint's weights file, embedding
table and float layers (lm_head is skipped by default) included.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from abqllm.errors import AbqError

CELL_VERSION = 1  # bump when a cell's meaning changes: every cached cell is recomputed
DEFAULT_CONFIGS = ("W8A8", "W4A16", "W4A8", "W3A16", "W2*A16", "W4A4")


@dataclass(frozen=True)
class SweepSettings:
    model: str = "smollm2-135m"
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    method: str = "rtn"
    preset: str | None = None
    method_opts: dict = field(default_factory=dict)
    data: str | None = None
    calib_samples: int | None = None
    calib_seqlen: int | None = None
    seed: int = 0
    window: int = 1024
    max_windows: int | None = None
    device: str = "cpu"
    out: str = "out/sweep"
    keep_checkpoints: bool = False

    def command(self) -> str:
        """The `abq sweep` command line that reproduces these settings."""
        parts = [f"abq sweep --model {self.model}", f"--configs '{','.join(self.configs)}'", f"--method {self.method}"]
        if self.preset:
            parts.append(f"--preset {self.preset}")
        parts += [f"--method-opt {k}={v}" for k, v in sorted(self.method_opts.items())]
        if self.data:
            parts.append(f"--data {self.data}")
        for flag, value, default in [("--calib-samples", self.calib_samples, None),
                                     ("--calib-seqlen", self.calib_seqlen, None), ("--seed", self.seed, 0),
                                     ("--window", self.window, 1024), ("--max-windows", self.max_windows, None)]:
            if value != default:
                parts.append(f"{flag} {value}")
        parts.append(f"--out {self.out}")
        return " ".join(parts)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cell_name(label: str, key: dict) -> str:
    return f"{label.replace('*', 's').replace(':', '-')}-{_digest(key)[:12]}"


def _read_cell(path: Path, key: dict) -> dict | None:
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or half-written by a killed run: compute it again
    return cell if cell.get("key") == json.loads(json.dumps(key, default=str)) else None


def safetensors_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, from its header (no tensor is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {name: t["data_offsets"][1] - t["data_offsets"][0] for name, t in header.items() if name != "__metadata__"}


def quantized_storage(checkpoint: Path, model) -> tuple[int, int]:
    """(bytes in the checkpoint of all quantized linear layers, their weight count)."""
    layers = model.config.quantization_config["layers"]
    sizes = safetensors_bytes(checkpoint / "model.safetensors")
    total_bytes = sum(b for name, b in sizes.items() if name.rsplit(".", 1)[0] in layers)
    params = 0
    for name in layers:
        m = model.get_submodule(name)
        params += m.in_features * m.out_features
    return total_bytes, params


def _method_source(method) -> dict | None:
    """The file that defines the method and its sha256: a cached cell made by other code gets a warning.

    Not part of the cell's key: a comment edit should not throw away hours of calibration, and the
    method's numbers also depend on code outside that file (runner, primitives)."""
    try:
        path = Path(inspect.getsourcefile(type(method)))
        root = Path(__file__).parent.parent
        return {"file": str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    except (TypeError, OSError):
        return None


def _machine() -> str:
    import torch

    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_sweep(s: SweepSettings, log: Callable[[str], None] = print) -> dict:
    """Compute (or read from the cache) every cell, then write the table and the picture. Returns the table."""
    import torch

    import abqllm
    from abqllm.data.sources import eval_token_ids, load_text
    from abqllm.eval.perplexity import perplexity
    from abqllm.methods import get_method, resolve_preset
    from abqllm.models.hub import is_quantized_checkpoint
    from abqllm.spec import parse_scheme

    # Everything the user typed is checked before any long work.
    if not s.configs:
        raise AbqError("no configurations given; pass --configs like W8A8,W4A16,W2*A16")
    specs = {}
    for name in s.configs:
        spec = parse_scheme(name)
        specs.setdefault(spec.name, spec)  # "w4a8" and "W4A8" are one cell
    if s.max_windows is not None and s.max_windows < 1:
        raise AbqError(f"--max-windows must be at least 1, got {s.max_windows}")
    options, (n_calib, seqlen), preset = resolve_preset(s.method, s.preset, torch.device(s.device).type)
    options.update(s.method_opts)
    method = get_method(s.method, **options)
    if Path(s.model).is_dir() and is_quantized_checkpoint(s.model):
        raise AbqError(f"{s.model} is already quantized; a sweep starts from the float model")
    n_calib, seqlen = s.calib_samples or n_calib, s.calib_seqlen or seqlen

    out = Path(s.out)
    cells_dir, work = out / "cells", out / "work"
    text = load_text(s.data)
    data = {"name": text.name, "sha256": _digest([text.calib, text.eval])}
    evaluation = {"window": s.window, "max_windows": s.max_windows}

    def evaluate(model, tok) -> dict:
        r = perplexity(model, eval_token_ids(tok, text), window=s.window, max_windows=s.max_windows)
        return {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "windows": r.windows, "eval_s": round(r.seconds, 1)}

    def stamp(cell: dict) -> dict:
        cell.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=_machine(),
                    abqllm_version=abqllm.__version__)
        return cell

    total = len(specs) + 1
    # The float reference.
    fkey = {"cell_version": CELL_VERSION, "model": s.model, "config": "float", "data": data, "eval": evaluation}
    fpath = cells_dir / f"{_cell_name('float', fkey)}.json"
    fcell = _read_cell(fpath, fkey)
    if fcell is not None:
        log(f"[1/{total}] float: cached ({fcell['ppl']:.3f})")
    else:
        log(f"[1/{total}] float: evaluating {s.model}")
        model, tok = abqllm.load_model(s.model, device=s.device)
        linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and
                   not next(iter(specs.values())).is_skipped(name)]
        bits = sum(m.weight.numel() * m.weight.element_size() * 8 for m in linears) / max(
            1, sum(m.weight.numel() for m in linears))
        fcell = stamp({"key": fkey, "config": "float", "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                       "bits_per_weight": bits, "size_mb": abqllm.model_size_bytes(model) / 2**20,
                       "quantize_s": 0.0, **evaluate(model, tok)})
        del model
        _write_atomic(fpath, json.dumps(fcell, indent=1))
        log(f"[1/{total}] float: perplexity {fcell['ppl']:.3f}")

    rows = [dict(fcell, ratio=1.0)]
    source = _method_source(method)
    for i, (name, spec) in enumerate(specs.items(), start=2):
        needs_data = method.needs_data(spec)
        key = {"cell_version": CELL_VERSION, "model": s.model, "config": name, "spec": spec.to_dict(),
               "method": method.name, "preset": preset, "method_settings": method.settings(),
               "calib": {"samples": n_calib, "seqlen": seqlen, "seed": s.seed} if needs_data else None,
               "data": data, "eval": evaluation}
        cname = _cell_name(f"{method.name}-{name}", key)
        path = cells_dir / f"{cname}.json"
        cell = _read_cell(path, key)
        if cell is not None:
            stale = cell.get("method_source") != source
            log(f"[{i}/{total}] {name}: cached ({cell['ppl']:.3f})" + (
                f"; made with another version of {source['file']}: delete {path} to recompute" if stale else ""))
        else:
            try:
                cell = _run_cell(s, spec, method, options, needs_data, n_calib, seqlen, text, work / cname,
                                 evaluate, lambda msg: log(f"[{i}/{total}] {name}: {msg}"))
            except AbqError as e:  # one configuration the method cannot do: report it, go on with the rest
                log(f"[{i}/{total}] {name}: skipped ({e})")
                rows.append({"config": name, "method": method.name, "error": str(e)})
                continue
            cell = stamp({"key": key, "config": name, "method": method.name, "preset": preset,
                          "method_source": source, **cell})
            _write_atomic(path, json.dumps(cell, indent=1))
            log(f"[{i}/{total}] {name}: perplexity {cell['ppl']:.3f}, {cell['bits_per_weight']:.3f} bits/weight, "
                f"{cell['size_mb']:.1f} MB")
        rows.append(dict(cell, ratio=cell["ppl"] / fcell["ppl"]))
    if work.exists() and not any(work.iterdir()):
        work.rmdir()

    result = {"command": s.command(), "model": s.model, "method": method.name, "preset": preset,
              "method_settings": method.settings(), "data": text.name, "split": text.description,
              "window": s.window, "max_windows": s.max_windows, "tokens": fcell["tokens"],
              "windows": fcell["windows"], "machine": _machine(),
              "rows": [{k: v for k, v in r.items() if k != "key"} for r in rows]}
    write_outputs(result, out)
    return result


def _run_cell(s: SweepSettings, spec, method, options: dict, needs_data: bool, n_calib: int, seqlen: int, text,
              work: Path, evaluate, log) -> dict:
    import abqllm
    from abqllm.data.sources import calibration_samples

    model, tok = abqllm.load_model(s.model, device="cpu")
    calib = calibration_samples(tok, text, n_calib, seqlen, seed=s.seed) if needs_data else None
    # Calibrating methods keep per-block results here: a killed sweep resumes inside the cell.
    artifacts = work.with_suffix(".calib") if needs_data and method.name != "rtn" else None
    log(f"quantizing with {method.name}" + (f" on {n_calib} x {seqlen} calibration tokens" if needs_data else ""))
    report = abqllm.quantize(model, spec, method=method.name, calib_ids=calib, device=s.device,
                             data=text.name if needs_data else None, seed=s.seed, artifacts=artifacts, **options)
    model.to("cpu")
    # The checkpoint is written only to be measured, unless it is kept: then outside the results folder.
    with tempfile.TemporaryDirectory(prefix="abq-sweep-") as tmp:
        ckpt = abqllm.save_quantized(model, tok, work if s.keep_checkpoints else Path(tmp) / "ckpt", overwrite=True)
        qbytes, qparams = quantized_storage(ckpt, model)
        size = (ckpt / "model.safetensors").stat().st_size
    log(f"evaluating ({qbytes * 8 / qparams:.3f} bits/weight)")
    model.to(s.device)
    ev = evaluate(model, tok)
    if artifacts is not None and not s.keep_checkpoints:
        shutil.rmtree(artifacts, ignore_errors=True)
    return {"scheme": report.spec, "weight_bits": spec.weight.bits, "balanced": spec.weight.balanced,
            "storage_bits": spec.weight.storage_bits, "group_size": spec.weight.group_size, "act_bits": spec.act.bits,
            "bits_per_weight": qbytes * 8 / qparams, "quantized_bytes": qbytes, "quantized_params": qparams,
            "layers": report.layers, "size_mb": size / 2**20, "quantize_s": round(report.seconds, 1),
            "checkpoint": str(ckpt) if s.keep_checkpoints else None, **ev}


# ---- table and picture ----------------------------------------------------------------------------

COLUMNS = ["config", "method", "bits_per_weight", "size_mb", "ppl", "ratio", "quantize_s", "eval_s", "tokens"]


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "sweep.json", json.dumps(result, indent=1))
    rows = [r for r in result["rows"] if "error" not in r]
    with open(out / "sweep.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["error"], extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(out / "sweep.csv.tmp", out / "sweep.csv")
    windows = "all" if result["max_windows"] is None else f"first {result['windows']}"
    method = result["method"] + (f" (preset {result['preset']})" if result["preset"] else "")
    lines = [f"# {result['model']}: {method} sweep", "",
             f"Command: `{result['command']}`  ",
             f"Evaluation: perplexity on the {windows} windows of {result['window']} tokens "
             f"({result['tokens']} predicted tokens) of {result['data']}; {result['split']}  ",
             f"Machine: {result['machine']}. Dates and settings of each cell: cells/*.json.", "",
             "| config | bits/weight | size MB | perplexity | x float | quantize s | eval s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | - | - | failed: {r['error']} | - | - | - |")
            continue
        label = "float" + (f" ({r['dtype']})" if r.get("dtype") else "") if r["config"] == "float" else r["config"]
        lines.append(f"| {label} | {r['bits_per_weight']:.3f} | {r['size_mb']:.1f} | {_num(r['ppl'])} | "
                     f"{_num(r['ratio'])} | {r['quantize_s']:.1f} | {r['eval_s']:.0f} |")
    lines += ["", "bits/weight: checkpoint bytes of the quantized linear layers (codes, fp16 scales, uint8 zero "
              "points) x 8 / their weight count; size MB: the whole weights file (float embeddings and lm_head "
              "included; for the float model, its weights in memory).", "", "![perplexity against size](sweep.png)"]
    _write_atomic(out / "sweep.md", "\n".join(lines) + "\n")
    if rows:
        plot(result, out / "sweep.png")


def _num(v: float) -> str:
    return f"{v:.3f}" if v < 1e4 else f"{v:.4g}"


_MARKERS = {16: ("o", "tab:blue", "A16 (weight-only)"), 8: ("s", "tab:orange", "A8"), 6: ("D", "tab:green", "A6"),
            4: ("^", "tab:red", "A4")}


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise AbqError("the sweep picture needs matplotlib: pip install 'abqllm[plot]' (or pip install "
                       "matplotlib); the table was written") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in result["rows"] if "error" not in r]
    fp = next(r for r in rows if r["config"] == "float")
    qrows = [r for r in rows if r["config"] != "float"]
    ppls = [r["ppl"] for r in rows]  # float included: its line must be inside the y range
    log_y = max(ppls) / min(ppls) > 5
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), constrained_layout=True)
    panels = [("bits_per_weight", "bits per weight of the quantized linear layers (codes + scales + zero points)"),
              ("size_mb", "checkpoint size (MB; float embeddings and lm_head included)")]
    for ax, (xkey, xlabel) in zip(axes, panels):
        ax.axhline(fp["ppl"], color="0.35", ls="--", lw=1.2, zorder=1)
        for group in _coincident(qrows, xkey, log_y):
            # Configurations at the same place (W4A16 and W4A8 share their weights' size) get one label and
            # nested markers, the first drawn largest, so each stays visible.
            for j, r in enumerate(group):
                marker, color, label = _MARKERS.get(r.get("act_bits"), ("P", "tab:purple", f"A{r.get('act_bits')}"))
                ax.scatter(r[xkey], r["ppl"], marker=marker, color=color, s=55 * 2.2 ** (len(group) - 1 - j),
                           zorder=3 + j, edgecolor="black", linewidth=0.5)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (lower is better" + (", log scale)" if log_y else ")"))
        ax.grid(True, which="major", alpha=0.3)
        ax.margins(x=0.12, y=0.12)
        _label_points(fig, ax, [(g[0][xkey], g[0]["ppl"], ", ".join(r["config"] for r in g))
                                for g in _coincident(qrows, xkey, log_y)])
    # The float model is a line, not a point: at 32 bits and its full size it would squeeze the others.
    handles = [Line2D([], [], color="0.35", ls="--", lw=1.2,
                      label=f"float ({fp.get('dtype', 'fp')}, {fp['size_mb']:.0f} MB): perplexity {_num(fp['ppl'])}")]
    for bits in sorted({r.get("act_bits") for r in qrows}, reverse=True):
        marker, color, label = _MARKERS.get(bits, ("P", "tab:purple", f"A{bits}"))
        handles.append(Line2D([], [], marker=marker, color=color, ls="", markersize=8, markeredgecolor="black",
                              markeredgewidth=0.5, label=label))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False,
               title="marker = activation bits", title_fontsize=9)
    windows = "all" if result["max_windows"] is None else f"first {result['windows']}"
    method = result["method"] + (f" ({result['preset']})" if result["preset"] else "")
    fig.suptitle(f"{result['model']}, {method}: perplexity against size\n"
                 f"{result['data']} evaluation text, {windows} windows of {result['window']} tokens "
                 f"({result['tokens']:,} predicted tokens)", fontsize=12)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _coincident(rows: list[dict], xkey: str, log_y: bool) -> list[list[dict]]:
    """Rows grouped where their points would overlap: within 1.5% of the x range and 3% of the y range."""
    xs = [r[xkey] for r in rows]
    ys = [math.log(r["ppl"]) if log_y else r["ppl"] for r in rows]
    dx, dy = 0.015 * (max(xs) - min(xs) or 1), 0.03 * (max(ys) - min(ys) or 1)
    groups: list[list[int]] = []
    for i in range(len(rows)):
        home = next((g for g in groups if abs(xs[g[0]] - xs[i]) <= dx and abs(ys[g[0]] - ys[i]) <= dy), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return [[rows[i] for i in g] for g in groups]


def _label_points(fig, ax, points: list[tuple[float, float, str]]) -> None:
    """Write each point's config beside it, trying a few offsets so labels overlap neither each other nor points."""
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    marker_boxes = []
    for x, y, _ in points:
        px, py = ax.transData.transform((x, y))
        marker_boxes.append((px - 6, py - 6, px + 6, py + 6))
    placed = []
    offsets = [(8, 6), (8, -14), (-8, 6), (-8, -14), (8, 20), (-8, 20), (8, -28), (-8, -28), (8, 34), (-8, 34)]

    def overlaps(a, b):
        return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])

    for x, y, text in sorted(points, key=lambda p: (p[0], p[1])):
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=9,
                              ha="left" if dx > 0 else "right", va="bottom",
                              arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6) if (dx, dy) != offsets[0] else None)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            if not any(overlaps(box, o) for o in placed + marker_boxes):
                break
            ann.remove()
        else:
            ann = ax.annotate(text, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=9)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
        placed.append(box)
