"""Measure which linear kernel is fastest for a model's own layers on this GPU, and write a dispatch table for it.

`abq tune-kernels --model CKPT` runs this. For every distinct layer (scheme class, N, K) of the model it times every
registered kernel that serves the layer on the device (the slow references excepted) at each row count, on random
inputs, with weight copies rotated past the L2 cache (timing.py), and derives the rules as the GPU suite's tables
are derived (dispatch_table.derive_rules: geometric mean over the layers of a class, a margin before leaving the
default). `save_table` writes it where `auto` finds it for this GPU model: the measured kernel, per layer and per
row count, from then on.
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch

from abqllm.kernels import dispatch_table as DT
from abqllm.kernels import registry
from abqllm.kernels.timing import copies_to_miss_l2, median_seconds

DEFAULT_ROWS = (1, 2, 4, 8, 16, 64, 256, 2048)
EXCLUDED = ("reference", "bitplane")  # float64 / bit-by-bit references: correct, never fast


def distinct_layers(model: torch.nn.Module) -> list:
    """One QuantLinear per (scheme, N, K): the cases the table is measured on."""
    from abqllm.nn import QuantLinear
    seen = {}
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            seen.setdefault((mod.spec, mod.out_features, mod.in_features), mod)
    return list(seen.values())


def candidates(layer, device: torch.device) -> list[str]:
    return [name for name in registry.supporting("linear", layer, device) if name not in EXCLUDED]


def _packed_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.zeros))


def tune_layers(layers: list, device: torch.device, rows=DEFAULT_ROWS, dtype: torch.dtype = torch.float16,
                calls: int = 20, replays: int = 7, log: Callable[[str], None] = print) -> dict:
    """Time every candidate kernel on each layer at each row count; returns the table (dispatch_table's format)."""
    if not layers:
        raise ValueError("no quantized layers to tune")
    cuda = device.type == "cuda"
    default = registry.select("linear", "auto", layers[0], device).name  # auto's choice without a table
    times: dict = {}
    measured = []
    for layer in layers:
        base = copy.deepcopy(layer).to(device)
        base.kernel = "auto"
        copies = [base] + [copy.deepcopy(base) for _ in range(copies_to_miss_l2(_packed_bytes(base), device) - 1)]
        n, k, cls = base.out_features, base.in_features, DT.scheme_class(base)
        for m in rows:
            xs = [torch.randn(m, k, device=device, dtype=dtype) for _ in copies]
            for name in candidates(base, device):
                fn = registry.select("linear", name, base, device).fn
                t0 = time.time()
                try:
                    t = median_seconds([lambda L=L, x=x: fn(L, x) for L, x in zip(copies, xs)], cuda, calls, replays)
                except Exception as e:  # noqa: BLE001  (a kernel that fails here is simply not a candidate)
                    log(f"  {base.spec.name} {n}x{k} M={m} {name}: failed ({type(e).__name__}: {str(e)[:120]})")
                    continue
                times.setdefault((cls, m), {}).setdefault(name, {})[(base.spec.name, n, k)] = t["s"]
                measured.append(dict(scheme=base.spec.name, n=n, k=k, m=m, kernel=name, us=round(t["s"] * 1e6, 2),
                                     mode=t["mode"], wall_s=round(time.time() - t0, 2)))
            log(f"  {base.spec.name} {n}x{k} M={m}: " + ", ".join(
                f"{r['kernel']} {r['us']:.1f} us" for r in measured if (r['n'], r['k'], r['m']) == (n, k, m)
                and r["scheme"] == base.spec.name))
        del copies, base
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return dict(device=name, source="abq tune-kernels", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                default=default, margin=DT.MARGIN, rules=DT.derive_rules(times, default=default),
                measurements=measured)


def table_path(device_name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"
    return DT.user_tables_dir() / f"{slug}.json"


def save_table(table: dict, path: Path | None = None) -> Path:
    """Write atomically (a reader never sees half a table) and make `auto` reload the tables."""
    path = Path(path) if path else table_path(table["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    DT.reset()
    return path


def format_rules(table: dict) -> str:
    lines = [f"{'class':10s} {'M <=':>6s}  kernel          vs {table.get('default', DT.DEFAULT)}"]
    for r in table["rules"]:
        score = r["evidence"]["geomean"]
        base = score.get(table.get("default", DT.DEFAULT))
        gain = f"{base / score[r['kernel']]:.2f}x" if base else "-"
        cls = f"W{r['storage_bits']}A{r['act_bits']}{' pc' if r['per_channel'] else ''}"
        lines.append(f"{cls:10s} {r['m_max']:>6d}  {r['kernel']:15s} {gain}")
    return "\n".join(lines)
