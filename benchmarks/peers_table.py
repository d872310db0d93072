"""Peer quantization libraries on our model, data and protocol (issue 3).

    OMP_NUM_THREADS=1 python benchmarks/peers_table.py --max-windows 16
    OMP_NUM_THREADS=1 python benchmarks/peers_table.py --peers hqq --configs W4A16g64,W3A16g64 --max-windows 16

Each peer is installed from PyPI (`pip install --no-deps hqq optimum-quanto torchao`, see the markdown
written beside the results) and applied through its own public API to the float model that
`abqllm.load_model` returns (float32, CPU): every linear inside the decoder blocks is quantized;
lm_head and the embeddings stay float, as in our table. Perplexity is our `perplexity()` on our
evaluation token stream (`eval_token_ids(tok, load_text(None))`, windows of 1024 tokens), so the
numbers sit beside benchmarks/results/rtn_smollm2-135m.md. A peer that needs calibration data
(optimum-quanto's static activation scales) gets 16 windows of 256 tokens of our calibration text.

Results are cached per (peer, config, windows) in benchmarks/results/peers_<model>.json, merged on
write; a cached cell is not rerun (delete it to redo it). A cell that fails is recorded with its
error and shown as such in the markdown. Not part of the test run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import abqllm
from abqllm.data.sources import calibration_samples, eval_token_ids, load_text
from abqllm.eval.perplexity import perplexity

CALIB = (16, 256)  # windows x tokens, for the peers that calibrate (our `cpu` preset's size)
GROUP = 64
FLOAT_TRANSFORMERS = "5.23.0"  # the main environment's; a peer environment with another one gets its own float row
# Columns of the markdown table, in order; a peer's config outside this list gets its own column.
COLUMNS = ["W8A16", "W8A16g64", "W4A16", "W4A16g64", "W3A16", "W3A16g64", "W2A16g64", "W8A8", "W4A8", "W4A8g64"]


@dataclass(frozen=True)
class Cell:
    """One configuration of one peer: how to apply it, and what it stores per weight."""
    config: str                                     # our scheme name (W4A16g64 ...), with a suffix for variants
    call: str                                       # the peer call, as written in the results
    apply: Callable[[nn.Module, torch.Tensor | None], None]
    wbits: float                                    # bits per weight code
    meta_bits: int                                  # bits of scale + zero per group, at 16-bit float metadata
    group: int | Callable[[int], int] | None        # group size, a function of in_features, or None = per channel
    needs_calib: bool = False
    notes: str = ""


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def bits_per_weight(shapes: list[tuple[int, int]], cell: Cell) -> float:
    """Weighted over the decoder linears: code bits plus scale/zero bits per weight."""
    total = meta = 0
    for out_f, in_f in shapes:
        g = cell.group(in_f) if callable(cell.group) else (cell.group or in_f)
        total += out_f * in_f
        meta += out_f * (in_f // g) * cell.meta_bits
    return cell.wbits + meta / total


# ---- HQQ ------------------------------------------------------------------------------------------

def hqq_cells() -> list[Cell]:
    def make(nbits, group, axis):
        def apply(model, _calib):
            from hqq.core.quantize import BaseQuantizeConfig
            from hqq.models.hf.base import AutoHQQHFModel
            cfg = BaseQuantizeConfig(nbits=nbits, group_size=group, axis=axis)
            AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=torch.float32, device="cpu")
        name = f"W{nbits}A16" + (f"g{group}" if group else "") + ("-axis0" if axis == 0 else "")
        call = (f"AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits={nbits}, "
                f"group_size={group}, axis={axis}), compute_dtype=torch.float32, device='cpu')")
        notes = "HQQ half-quadratic optimized scale/zero, no data; fp32 scale+zero here (compute_dtype)"
        if axis == 0:
            notes += "; axis=0 groups 64 weights of one input column (strided rows), not 64 consecutive inputs"
        return Cell(name, call, apply, 3.2 if nbits == 3 else nbits, 32, group, notes=notes)
    return [make(8, GROUP, 1), make(4, GROUP, 1), make(3, GROUP, 1), make(2, GROUP, 1),
            make(4, None, 1), make(3, None, 1), make(4, GROUP, 0), make(3, GROUP, 0), make(2, GROUP, 0)]


# ---- optimum-quanto -------------------------------------------------------------------------------

def _quanto_group(in_f: int) -> int:
    """quanto's own group size for qint2/qint4 (nn/qmodule.py): 128, less 32 until it divides in_features."""
    g = 128
    while in_f % g and g > 32:
        g -= 32
    return g if in_f % g == 0 else in_f


def quanto_cells() -> list[Cell]:
    def make(wname, aname, group_override=None):
        wbits = {"qint8": 8, "qint4": 4, "qint2": 2}[wname]

        def apply(model, calib):
            from optimum import quanto
            quanto.quantize(model, weights=getattr(quanto, wname),
                            activations=getattr(quanto, aname) if aname else None, exclude=["lm_head"])
            if group_override:  # no public option: quanto picks 128 (96 for 576 inputs); set before freeze
                for m in model.modules():
                    if isinstance(m, quanto.QLinear):
                        m.weight_group_size = group_override
            if aname:
                with torch.no_grad(), quanto.Calibration(momentum=0.9):
                    for row in calib:
                        model(input_ids=row[None], use_cache=False)
            quanto.freeze(model)

        if wbits == 8:
            group, meta, gname = None, 16, ""           # symmetric per output channel, scale only
        else:
            group = group_override or _quanto_group
            meta, gname = 32, f"g{group_override}" if group_override else "g96/128"
        name = f"W{wbits}A{8 if aname else 16}{gname}"
        call = (f"quantize(model, weights={wname}, activations={aname}, exclude=['lm_head'])"
                + (f"; QLinear.weight_group_size = {group_override}" if group_override else "")
                + (f"; with Calibration(momentum=0.9): model(each of {CALIB[0]} x {CALIB[1]} calibration windows)"
                   if aname else "") + "; freeze(model)")
        notes = ("qint8: symmetric absmax per output channel" if wbits == 8 else
                 "asymmetric min/max (scale + float shift) per group; library groups of 128, or 96 where "
                 "in_features=576" if not group_override else
                 "groups of 64 set through the QLinear.weight_group_size attribute (no public option)")
        if aname:
            notes += "; activations: static per-tensor int8 scales (absmax, momentum 0.9), also on each linear's output"
        return Cell(name, call, apply, wbits, meta, group, needs_calib=bool(aname), notes=notes)
    return [make("qint8", None), make("qint4", None), make("qint4", None, GROUP), make("qint2", None),
            make("qint2", None, GROUP), make("qint8", "qint8"), make("qint4", "qint8")]


# ---- torchao --------------------------------------------------------------------------------------

def torchao_cells() -> list[Cell]:
    def not_head(module, fqn):
        return isinstance(module, nn.Linear) and ".layers." in fqn

    def make(name, build, call, wbits, meta, group, notes):
        def apply(model, _calib):
            from torchao.quantization import quantize_
            quantize_(model, build(), filter_fn=not_head)
        return Cell(name, call, apply, wbits, meta, group, notes=notes)

    def intx(bits, group):
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup
        return lambda: IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                            granularity=PerGroup(group) if group else PerAxis(0),
                                            mapping_type=MappingType.ASYMMETRIC)

    def w4a8(group):
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, MappingType, PerAxis, PerGroup
        return lambda: Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group) if group else PerAxis(0),
            weight_mapping_type=MappingType.ASYMMETRIC)

    def int8wo():
        from torchao.quantization import Int8WeightOnlyConfig
        return Int8WeightOnlyConfig()

    def int8dq():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        return Int8DynamicActivationInt8WeightConfig()

    intx_note = ("asymmetric min/max, scale + int8 zero point; IntxUnpackedToInt8Tensor (codes held in int8 "
                 "on CPU, the default packing format)")
    cells = [make("W8A16", int8wo, "quantize_(model, Int8WeightOnlyConfig())  # PerRow, symmetric", 8, 16, None,
                  "symmetric per output channel (Int8Tensor)")]
    for bits, group in [(8, GROUP), (4, GROUP), (3, GROUP), (2, GROUP), (4, None), (3, None)]:
        gran = f"PerGroup({group})" if group else "PerAxis(0)"
        cells.append(make(f"W{bits}A16" + (f"g{group}" if group else ""), intx(bits, group),
                          f"quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, granularity={gran}, "
                          f"mapping_type=MappingType.ASYMMETRIC))", bits, 24, group, intx_note))
    cells.append(make("W8A8", int8dq, "quantize_(model, Int8DynamicActivationInt8WeightConfig())  # PerRow weights, "
                      "symmetric per-token dynamic activations", 8, 16, None,
                      "symmetric per-channel weights, dynamic symmetric per-token int8 activations"))
    for group in [None, GROUP]:
        gran = f"PerGroup({group})" if group else "PerAxis(0)"
        cells.append(make("W4A8" + (f"g{group}" if group else ""), w4a8(group),
                          f"quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, "
                          f"weight_granularity={gran}, weight_mapping_type=MappingType.ASYMMETRIC))", 4, 24, group,
                          "asymmetric int4 weights; dynamic asymmetric per-token int8 activations (library default)"))
    return cells


# ---- llm-compressor -------------------------------------------------------------------------------

def llmcompressor_cells() -> list[Cell]:
    """GPTQ (and SmoothQuant + GPTQ, AWQ) through `oneshot`, on 16 x 256 tokens of our calibration text.

    The model is evaluated as `oneshot` leaves it: compressed-tensors' quantize-dequantize forward
    (weights rounded in place, activations quantized on the fly), i.e. the numbers of the compressed model.
    """
    def scheme(bits, group, act):
        w = {"num_bits": bits, "type": "int", "symmetric": False,
             "strategy": "group" if group else "channel", **({"group_size": group} if group else {})}
        a = {"input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                   "dynamic": True}} if act else {}
        return {"weights": w, **a}

    def make(name, recipe, call, wbits, meta, group, notes):
        def apply(model, calib):
            from datasets import Dataset
            from llmcompressor import oneshot
            ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
            oneshot(model=model, dataset=ds, recipe=recipe(), num_calibration_samples=len(calib),
                    max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
        return Cell(name, call, apply, wbits, meta, group, needs_calib=True, notes=notes)

    def gptq(bits, group, act=False):
        def recipe():
            from llmcompressor.modifiers.quantization import GPTQModifier
            return [GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups={
                "group_0": {"targets": ["Linear"], **scheme(bits, group, act)}})]
        return recipe

    def sq_gptq_w8a8():
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]

    def awq(bits, group):
        def recipe():
            from llmcompressor.modifiers.awq import AWQModifier
            return [AWQModifier(targets=["Linear"], ignore=["lm_head"], config_groups={
                "group_0": {"targets": ["Linear"], **scheme(bits, group, False)}})]
        return recipe

    gptq_note = ("GPTQ (block 128, dampening 0.01, actorder static), asymmetric min/max ranges, scale + int8 zero "
                 "point")
    cells = []
    for bits, group in [(8, None), (4, GROUP), (3, GROUP), (2, GROUP), (4, None), (3, None)]:
        gname = f"g{group}" if group else ""
        cells.append(make(f"W{bits}A16{gname}-gptq", gptq(bits, group),
                          f"oneshot(model, dataset=calib, recipe=[GPTQModifier(targets='Linear', ignore=['lm_head'], "
                          f"config_groups={{'group_0': {{'targets': ['Linear'], **{scheme(bits, group, False)}}}}})])",
                          bits, 24, group, gptq_note))
    for group in [None, GROUP]:
        gname = f"g{group}" if group else ""
        cells.append(make(f"W4A8{gname}-gptq", gptq(4, group, True),
                          f"oneshot(model, dataset=calib, recipe=[GPTQModifier(targets='Linear', ignore=['lm_head'], "
                          f"config_groups={{'group_0': {{'targets': ['Linear'], **{scheme(4, group, True)}}}}})])",
                          4, 24, group, gptq_note + "; dynamic symmetric per-token int8 activations"))
    cells.append(make("W8A8-sq+gptq", sq_gptq_w8a8,
                      "oneshot(model, dataset=calib, recipe=[SmoothQuantModifier(smoothing_strength=0.8), "
                      "GPTQModifier(targets='Linear', scheme='W8A8', ignore=['lm_head'])])", 8, 16, None,
                      "the library's W8A8 example recipe: SmoothQuant alpha 0.8, then GPTQ; symmetric per-channel "
                      "int8 weights, dynamic symmetric per-token int8 activations"))
    cells.append(make("W4A16g64-awq", awq(4, GROUP),
                      f"oneshot(model, dataset=calib, recipe=[AWQModifier(targets=['Linear'], ignore=['lm_head'], "
                      f"config_groups={{'group_0': {{'targets': ['Linear'], **{scheme(4, GROUP, False)}}}}})])",
                      4, 24, GROUP, "AWQ scale search (library defaults), then min/max rounding; asymmetric"))
    return cells


# ---- our RTN, for the configurations our RTN table lacks -----------------------------------------

def ours_cells() -> list[Cell]:
    def make(name):
        return Cell(name, f"abqllm.quantize(model, '{name}', method='rtn')",
                    lambda model, _c: abqllm.quantize(model, name, method="rtn", progress=False),
                    int(name[1]), 24, GROUP, notes="asymmetric min/max, fp16 scale + uint8 zero")
    return [make("W8A16g64"), make("W3A16g64"), make("W2A16g64"), make("W4A8g64")]


PEERS = {"hqq": ("hqq", hqq_cells), "optimum-quanto": ("optimum-quanto", quanto_cells),
         "torchao": ("torchao", torchao_cells), "llm-compressor": ("llmcompressor", llmcompressor_cells),
         "abqllm-rtn": ("abqllm", ours_cells)}


def run_cell(model_name: str, cell: Cell, ids: torch.Tensor, text, max_windows: int | None) -> dict:
    model, tok = abqllm.load_model(model_name)
    linears = decoder_linears(model)
    shapes = [tuple(m.weight.shape) for m in linears.values()]
    calib = calibration_samples(tok, text, *CALIB, seed=0) if cell.needs_calib else None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cell.apply(model, calib)
    qs = time.perf_counter() - t0
    n_before = len(linears)
    now = dict(model.named_modules())  # the peer replaces each linear (HQQ, quanto) or its weight (torchao)
    quantized = [n for n in linears if n in now and (type(now[n]) is not nn.Linear or type(now[n].weight) is not nn.Parameter
                                                      or getattr(now[n], "quantization_scheme", None) is not None)]
    left_float = sorted(set(linears) - set(quantized))
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear and type(head.weight) is nn.Parameter and \
        getattr(head, "quantization_scheme", None) is None, "lm_head must stay float"
    if left_float or len(quantized) != n_before:
        raise RuntimeError(f"{len(quantized)} of {n_before} decoder linears quantized; left float: {left_float[:3]}")
    r = perplexity(model, ids, max_windows=max_windows)
    return {"ppl": r.ppl, "tokens": r.tokens, "eval_s": round(r.seconds, 1), "quantize_s": round(qs, 1),
            "bits_per_weight": round(bits_per_weight(shapes, cell), 3), "calib": list(CALIB) if calib is not None else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--peers", default="hqq,torchao,optimum-quanto,abqllm-rtn")
    ap.add_argument("--configs", default=None, help="comma-separated config names (default: all of each peer)")
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    cache_path = Path(a.out) / f"peers_{Path(a.model).name}.json"
    text = load_text(None)
    wk = f"w{a.max_windows or 'all'}"
    ids = None
    for peer in a.peers.split(","):
        dist, cells = PEERS[peer]
        version = importlib.metadata.version(dist)
        for cell in cells():
            if a.configs and cell.config not in a.configs.split(","):
                continue
            key = f"{peer}|{cell.config}|{wk}"
            if cache_path.exists() and key in json.loads(cache_path.read_text())["results"]:
                continue
            if ids is None:
                ids = _float_reference(a.model, text, a.max_windows, cache_path, wk)
            print(f"{peer} {version} {cell.config}: {cell.call}", flush=True)
            try:
                res = run_cell(a.model, cell, ids, text, a.max_windows)
                print(f"  ppl {res['ppl']:.3f}, quantize {res['quantize_s']} s, eval {res['eval_s']} s", flush=True)
            except Exception as e:  # a peer's failure on this setting is a result too
                res = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                       "traceback": traceback.format_exc()[-2000:]}
                print(f"  failed: {res['error']}", flush=True)
            res.update(version=version, transformers=importlib.metadata.version("transformers"), call=cell.call, notes=cell.notes, command="python " + " ".join(sys.argv),
                       date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            _merge_write(cache_path, key, res)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {"results": {}}
    cache["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    cache["data"] = {"name": text.name, "split": text.description}
    _merge_write(cache_path, None, None, extra={k: cache[k] for k in ("machine", "data")})
    write_markdown(json.loads(cache_path.read_text()), cache_path.with_suffix(".md"),
                   Path(a.out) / f"rtn_{Path(a.model).name}.json")


def _float_reference(model_name, text, max_windows, cache_path, wk) -> torch.Tensor:
    model, tok = abqllm.load_model(model_name)
    ids = eval_token_ids(tok, text)
    tf = importlib.metadata.version("transformers")
    key = f"float|fp32|{wk}" if tf == FLOAT_TRANSFORMERS else f"float|fp32 (transformers {tf})|{wk}"
    if not (cache_path.exists() and key in json.loads(cache_path.read_text())["results"]):
        r = perplexity(model, ids, max_windows=max_windows)
        _merge_write(cache_path, key, {"ppl": r.ppl, "tokens": r.tokens, "eval_s": round(r.seconds, 1),
                                       "torch": torch.__version__, "transformers": importlib.metadata.version("transformers")})
        print(f"float: ppl {r.ppl:.3f}", flush=True)
    return ids


def _merge_write(path: Path, key: str | None, res: dict | None, extra: dict | None = None) -> dict:
    """Add one result (and top-level fields) to the cache as it is on disk now (atomic replace)."""
    cache = json.loads(path.read_text()) if path.exists() else {"results": {}}
    if key is not None:
        cache["results"][key] = res
    cache.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, path)
    return cache


def write_markdown(cache: dict, path: Path, rtn_path: Path):
    """One row per (library, variant), one column per scheme; a config `W4A16g64-axis0` is scheme W4A16g64
    in the row `hqq axis0`."""
    res = cache["results"]
    lines = ["# Peer libraries on the default model", "",
             "Made by `OMP_NUM_THREADS=1 /tmp/peers-venv/bin/python benchmarks/peers_table.py --max-windows 16` "
             "(llm-compressor: the same with `/tmp/llmc-venv/bin/python ... --peers llm-compressor`, see "
             "*Installation*); per-cell commands, calls, versions and dates are in the JSON beside this file.  ",
             f"Data: {cache.get('data', {}).get('split', '')}  ",
             f"Machine: {cache.get('machine', '')}.", ""]
    for wk in sorted({k.split("|")[-1] for k in res}):
        floats = [v["ppl"] for k, v in sorted(res.items()) if k.startswith("float|") and k.endswith("|" + wk)]
        fp = res.get(f"float|fp32|{wk}", {}).get("ppl", floats[0] if floats else float("nan"))

        def fp_of(e):  # a peer run under another transformers version is compared with the float run there
            other = res.get(f"float|fp32 (transformers {e.get('transformers')})|{wk}")
            return other["ppl"] if other else fp
        ours = {}
        if rtn_path.exists():  # our RTN table, same protocol, when it covers these windows
            rtn = json.loads(rtn_path.read_text())
            if f"w{rtn.get('windows')}" == wk:
                ours = {r["config"]: {"ppl": r["ppl"], "from_rtn_table": True} for r in rtn["rows"]
                        if not r["config"].startswith("float")}
        cells = {}  # (row label, scheme) -> result
        for k, e in res.items():
            peer, config, w = k.split("|")
            if w != wk or peer.startswith("float"):
                continue
            scheme, _, variant = config.partition("-")
            label = "abqllm RTN (ours)" if peer == "abqllm-rtn" else f"{peer} {variant}".strip()
            cells[(label, scheme)] = (k, e)
        if any(lab == "abqllm RTN (ours)" for lab, _ in cells):
            for scheme, e in ours.items():
                cells.setdefault(("abqllm RTN (ours)", scheme), (None, e))
        configs = [c for c in COLUMNS if any(s_ == c for _, s_ in cells)]
        configs += sorted({s_ for _, s_ in cells} - set(configs))
        rows = sorted({lab for lab, _ in cells}, key=lambda r: (r.startswith("abqllm"), r))
        windows = "all windows" if wk == "wall" else f"first {wk[1:]} windows"

        def table(fmt):
            out = ["| library | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
            for r in rows:
                out.append(f"| {r} | " + " | ".join(fmt(cells[(r, c)][1]) if (r, c) in cells else "-"
                                                     for c in configs) + " |")
            return out

        lines += [f"## Perplexity ({windows} of 1024 tokens; float fp32 {fp:.3f}); in brackets: ratio to float", ""]
        lines += table(lambda e: "fails" if "error" in e else
                       f"{e['ppl']:.2f} ({e['ppl'] / fp_of(e):.2f})" + ("\u2020" if e.get("from_rtn_table") else ""))
        for k in sorted(k for k in res if k.startswith("float|fp32 (") and k.endswith("|" + wk)):
            lines += ["", f"Float in the peer environment with {k.split('(')[1].split(')')[0]}: {res[k]['ppl']:.3f} "
                      "(the ratios of the cells run there are to this float)."]
        if any(lab == "abqllm RTN (ours)" for lab, _ in cells):
            lines += ["", "\u2020 from benchmarks/results/rtn_smollm2-135m.json (same model, data, windows and "
                      "perplexity code); the other abqllm cells were run by this script."]
        lines += ["", "Bits per weight of the decoder linears (codes + scale/zero per group, metadata counted at "
                  "16-bit floats; HQQ's 3-bit packing stores 10 codes in 32 bits):", ""]
        lines += table(lambda e: str(e.get("bits_per_weight", "-")))
        lines += ["", "Seconds on this machine (1 thread, on a shared, loaded machine: rough): quantize (including "
                  "calibration where the peer calibrates) / evaluation of all windows:", ""]
        lines += table(lambda e: f"{e['quantize_s']} / {e['eval_s']}" if "eval_s" in e else "-")
        lines += ["", "Exact calls and notes:", "", "| library | version | config | call | notes |",
                  "|---|---|---|---|---|"]
        for key, e in sorted((v for v in cells.values() if v[0]), key=lambda v: v[0]):
            p, c, _ = key.split("|")
            note = e.get("notes", "") + (f"; **fails: {e['error']}**" if "error" in e else "")
            lines.append(f"| {p} | {e.get('version', '')} | {c} | `{e.get('call', '')}` | {note} |")
        lines.append("")
    lines += NOTES
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


NOTES = [
    "## Installation", "",
    "On torch 2.13.0+cpu / transformers 5.23.0, in a virtual environment that sees the main one and replaces "
    "nothing in it:",
    "`python -m venv --system-site-packages /tmp/peers-venv && DISABLE_CUDA=1 /tmp/peers-venv/bin/pip install "
    "--no-deps hqq==0.2.8.post1 optimum-quanto==0.2.7 torchao==0.18.0 einops termcolor ninja`, "
    "then `OMP_NUM_THREADS=1 /tmp/peers-venv/bin/python benchmarks/peers_table.py --max-windows 16`.",
    "Why a separate environment: with torchao installed, transformers imports it on every `from_pretrained` "
    "(transformers/quantizers/quantizer_torchao.py), and torchao 0.18.0 then prints that its CUDA-only extensions "
    "(_C_mxfp8, _C_cutlass_90a) do not load, plus torch pytree deprecation warnings, on every model load. "
    "DISABLE_CUDA=1 stops HQQ's setup from trying to build its CUDA extension. The CPU paths used here need none of these.",
    "llm-compressor 0.14.0.1 pins transformers<=5.17.0 and compressed-tensors==0.19.0 (the main environment has "
    "transformers 5.23.0 and compressed-tensors 0.20.0, which our exporter needs), so it lives in a second "
    "environment that overrides only those: `python -m venv --system-site-packages /tmp/llmc-venv && "
    "/tmp/llmc-venv/bin/pip install llmcompressor==0.14.0.1` (it added auto-round 0.15.1, compressed-tensors 0.19.0, "
    "transformers 5.17.0, huggingface_hub 1.33.0, nvidia-ml-py, httpx; torch 2.13.0+cpu stayed), then "
    "`OMP_NUM_THREADS=1 /tmp/llmc-venv/bin/python benchmarks/peers_table.py --max-windows 16 --peers llm-compressor`. "
    "Its float perplexity under transformers 5.17.0 is reported beside the table.",
    "",
]


if __name__ == "__main__":
    main()
