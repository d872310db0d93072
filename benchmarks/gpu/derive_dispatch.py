"""Derive a dispatch table (abqllm/kernels/dispatch_table.py) from a GPU suite run: for each scheme class and each
M of the kernel grid, the kernel of ours with the lowest geometric-mean time over the grid's shapes.

    python benchmarks/gpu/derive_dispatch.py RESULTS_JSON --out TABLE_JSON [--md SUMMARY_MD]

A kernel competes at an M only where it was timed on every shape (and scheme of the class) that `triton`, the
priority default, was. A rule names another kernel only when it beats `triton` by more than MARGIN, so that timing
noise never flips a default. Each rule carries its evidence (geometric means, shapes). Review the summary, then copy
the table into abqllm/kernels/tables/ to make `auto` use it on that GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from abqllm.kernels.dispatch_table import DEFAULT, MARGIN, derive_rules  # noqa: E402
from benchmarks.gpu.suite_kernels import OURS  # noqa: E402

def scheme_class(scheme: str, group_size: int) -> tuple[int, int, bool] | None:
    """'W2*A8 pc' -> (3, 8, True); None for rows that are not a WpAq scheme of ours."""
    name, _, suffix = scheme.partition(" ")
    if not name.startswith("W") or "A" not in name:
        return None
    w, a = name[1:].split("A", 1)
    try:
        bits = 3 if w == "2*" else int(w)
        act = int(a)
    except ValueError:
        return None
    return bits, act, suffix == "pc" or group_size == 0


def _group_size(data: dict) -> int:
    steps = [s for s in data.get("steps", []) if "kernels" in s.get("sections", [])]
    return int(steps[-1].get("group_size", 128)) if steps else 128


def derive(data: dict, source: str = "") -> tuple[dict, list[str]]:
    rows = [r for r in data.get("kernels", {}).get("rows", []) if "us" in r and r.get("kernel") in OURS]
    gs = _group_size(data)
    # (class, m) -> kernel -> {(scheme, n, k): us}
    times: dict[tuple, dict[str, dict[tuple, float]]] = {}
    for r in rows:
        cls = scheme_class(r.get("scheme", ""), gs)
        if cls is None:
            continue
        times.setdefault((cls, r["m"]), {}).setdefault(r["kernel"], {})[(r["scheme"], r["n"], r["k"])] = r["us"]
    rules = derive_rules(times)
    lines = []
    for r in rules:
        score = r["evidence"]["geomean"]
        lines.append(f"| W{r['storage_bits']}A{r['act_bits']}{' pc' if r['per_channel'] else ''} | {r['m_max']} | "
                     f"{r['kernel']} | {score[DEFAULT] / score[r['kernel']]:.2f}x | "
                     + ", ".join(f"{k} {v:.1f}" for k, v in sorted(score.items(), key=lambda kv: kv[1])) + " |")
    env = data.get("env", {})
    table = dict(device=env.get("gpu", "?"), source=source, date=env.get("date", "?"), margin=MARGIN, rules=rules)
    md = [f"# Dispatch table from {source or 'a suite run'} ({table['device']}, {table['date']})", "",
          f"Per scheme class (storage bits, activation bits) and M: the kernel `auto` takes, its speed-up over "
          f"`{DEFAULT}` (geometric mean over the grid's shapes), and every candidate's geometric-mean time (us).",
          "", "| class | M <= | kernel | vs triton | candidates (us) |", "|---|---|---|---|---|", *lines, ""]
    return table, md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--out", required=True)
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    data = json.loads(Path(args.results).read_text())
    table, md = derive(data, source=args.results)
    if not table["rules"]:
        print(f"no kernel rows in {args.results}: nothing to derive", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
