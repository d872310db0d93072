"""A markdown report of one kp_check.py run, set against issue 4's targets.

    python benchmarks/gpu/kp_report.py OUT/kp.json > benchmarks/results/gpu_<chip>_<date>_kp.md

Only what the JSON holds: every number is read from it, and a target that the run did not reach is reported as
not measured. The prose (why a target is missed) is for the person committing the results to add.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# (label, scheme, factor): M = 1 at N = K = 8192 against torch fp16 (issue 4)
M1_TARGETS = [("W4A16 >= 2.5x fp16", "W4A16", 2.5), ("W2A16 >= 3.5x fp16", "W2A16", 3.5),
              ("W2A8 >= 3.5x fp16", "W2A8", 3.5), ("W8A8 >= 1.8x fp16", "W8A8", 1.8)]
# (label, scheme, baseline key, factor): M = 2048 against cuBLAS fp16 or torch._int_mm
LARGE_TARGETS = [("W8A8 >= 0.8x _int_mm", "W8A8", "int_mm_us", 0.8), ("W4A8 >= 0.8x _int_mm", "W4A8", "int_mm_us", 0.8),
                 ("W8A8 per channel >= 0.8x _int_mm", "W8A8/pc", "int_mm_us", 0.8),
                 ("W4A8 per channel >= 0.8x _int_mm", "W4A8/pc", "int_mm_us", 0.8),
                 ("W4A16 >= 0.7x fp16", "W4A16", "fp16_us", 0.7), ("W2A16 >= 0.7x fp16", "W2A16", "fp16_us", 0.7),
                 ("W3A16 >= 0.7x fp16", "W3A16", "fp16_us", 0.7)]
E2E_TARGETS = [("W4A16 >= 2.5x fp16", "W4A16", 2.5), ("W2A8 >= 3.5x fp16", "W2A8", 3.5)]
LARGE_KERNELS = ("kp_gemm", "qlinear", "dense")


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def times(v):
    return "-" if v is None else f"{v:.2f}x"


def verdict(ratio, factor):
    return "not measured" if ratio is None else ("met" if ratio >= factor else f"missed ({ratio / factor:.0%})")


def m1_section(d: dict) -> list[str]:
    rows = [t for t in d.get("timings", []) if "us" in t]
    if not rows:
        return ["## M = 1", "", "Not measured.", ""]
    out = ["## M = 1 (median us, CUDA-graph replays, weights rotated past L2)", ""]
    for n, k in sorted({(t["n"], t["k"]) for t in rows}, reverse=True):
        here = [t for t in rows if (t["n"], t["k"]) == (n, k)]
        fp16 = next((t["us"] for t in here if t["kernel"] == "torch fp16"), None)
        kernels = sorted({t["kernel"] for t in here if t["kernel"] != "torch fp16"})
        schemes = list(dict.fromkeys(t["scheme"] for t in here if "scheme" in t))
        out += [f"### N = {n}, K = {k}: torch fp16 {fmt(fp16)} us", "",
                "| scheme | " + " | ".join(kernels) + " | best vs fp16 |", "|---" * (len(kernels) + 2) + "|"]
        for sc in schemes:
            us = {t["kernel"]: t["us"] for t in here if t.get("scheme") == sc}
            best = min(us.values()) if us else None
            out.append(f"| {sc} | " + " | ".join(fmt(us.get(kn)) for kn in kernels)
                       + f" | {times(fp16 / best if fp16 and best else None)} |")
        out.append("")
    return out


def best_m1(d: dict, scheme: str, n=8192, k=8192):
    here = [t for t in d.get("timings", []) if "us" in t and (t["n"], t["k"]) == (n, k)]
    fp16 = next((t["us"] for t in here if t["kernel"] == "torch fp16"), None)
    ours = [(t["us"], t["kernel"]) for t in here if t.get("scheme") == scheme and not t["kernel"].startswith("gemlite")]
    peer = [t["us"] for t in here if t.get("scheme") == scheme and t["kernel"].startswith("gemlite")]
    if not ours or not fp16:
        return None, None, None
    us, kernel = min(ours)
    return fp16 / us, kernel, (min(peer) / us if peer else None)


def sweep_section(d: dict) -> list[str]:
    rows = [s for s in d.get("sweep", []) if "us" in s]
    if not rows:
        return []
    out = ["## Sweep at 8192^2 (us)", "", "| scheme | config | us |", "|---|---|---|"]
    for sc in dict.fromkeys(s["scheme"] for s in rows):
        for s in sorted((s for s in rows if s["scheme"] == sc), key=lambda s: s["us"])[:4]:
            out.append(f"| {sc} | `{json.dumps(s['config'], sort_keys=True)}` | {fmt(s['us'])} |")
    return out + [""]


def small_m_section(d: dict) -> list[str]:
    rows = d.get("small_m", [])
    if not rows:
        return []
    keys = [k for k in rows[0] if k.endswith("_us")]
    out = ["## Small M at 8192^2 (us)", "", "| scheme | M | " + " | ".join(k[:-3] for k in keys) + " |",
           "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        out.append(f"| {r['scheme']} | {r['m']} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |")
    return out + [""]


def large_section(d: dict) -> tuple[list[str], dict]:
    out, best = [], {}
    for r in d.get("large_m", []):
        out += [f"## M = {r['m']}, N = {r['n']}, K = {r['k']}: fp16 {fmt(r.get('fp16_us'))} us, "
                f"_int_mm {fmt(r.get('int_mm_us'))} us", "",
                "| scheme | " + " | ".join(LARGE_KERNELS) + " | expand alone | best vs fp16 | best vs _int_mm |",
                "|---" * (len(LARGE_KERNELS) + 4) + "|"]
        schemes = dict.fromkeys(key.split(" ")[0] for key in r if key.endswith("_us") and " " in key)
        for sc in schemes:
            us = {kn: r.get(f"{sc} {kn}_us") for kn in LARGE_KERNELS}
            got = [(v, kn) for kn, v in us.items() if v]
            b = min(got) if got else (None, None)
            if r["m"] == 2048 and (r["n"], r["k"]) == (8192, 8192):
                best[sc] = dict(us=b[0], kernel=b[1], fp16=r.get("fp16_us"), int_mm=r.get("int_mm_us"))
            out.append(f"| {sc} | " + " | ".join(fmt(us[kn]) for kn in LARGE_KERNELS)
                       + f" | {fmt(r.get(f'{sc} expand_us'))}"
                       + f" | {times(r['fp16_us'] / b[0] if b[0] and r.get('fp16_us') else None)}"
                       + f" | {times(r['int_mm_us'] / b[0] if b[0] and r.get('int_mm_us') else None)} |")
        out.append("")
    return out, best


def e2e_section(d: dict) -> tuple[list[str], dict]:
    rows = d.get("e2e", [])
    fp16 = next((r["tokens_per_s"] for r in rows if r["variant"] == "fp16" and "tokens_per_s" in r), None)
    out = ["## End to end, 7B shape, batch 1 (tokens/s)", "",
           "| variant | tok/s | vs fp16 | peak GB | (weights + KV) GB | peak / (weights + KV) | fused layers |",
           "|---|---|---|---|---|---|---|"]
    ratios, memory = {}, {}
    for r in rows:
        if "tokens_per_s" not in r:
            out.append(f"| {r['variant']} | error: {r.get('error', '')[:80]} | | | | | |")
            continue
        ratio = r["tokens_per_s"] / fp16 if fp16 else None
        wkv = (r.get("weight_bytes") or 0) + (r.get("kv_bytes") or 0)
        ratios[r["variant"]] = ratio
        if wkv and r.get("peak_bytes"):
            memory[r["variant"]] = r["peak_bytes"] / wkv
        out.append(f"| {r['variant']} | {fmt(r['tokens_per_s'])} | {times(ratio)} | {fmt(r['peak_bytes'] / 1e9, 2)} "
                   f"| {fmt(wkv / 1e9, 2)} | {fmt(r['peak_bytes'] / wkv if wkv else None, 3)} "
                   f"| {r.get('fused_layers')} |")
    return out + [""], (ratios, memory)


def report(d: dict) -> str:
    corr = d.get("correctness", [])
    bad = [c for c in corr if not c.get("ok")]
    out = [f"# kp_check: {d.get('gpu')}, {d.get('date')}", "",
           f"torch {d.get('torch')}, Triton {d.get('triton')}, {d.get('sms')} SMs; peer: {d.get('peer')}; "
           f"CUDA GEMV build: {d.get('cuda_gemv_build_s', d.get('cuda_gemv_build_error'))}", "",
           f"Ceilings: {json.dumps({k: round(v / 1e12, 2) for k, v in d.get('ceilings', {}).items() if v > 1e9})} "
           "(TB/s or T op/s)", "",
           f"Correctness: {len(corr) - len(bad)}/{len(corr)} within tolerance"
           + (f"; failures: {json.dumps(bad[:5])}" if bad else "")
           + f"; split-K workspace zero afterwards: {d.get('workspace_zero_after')}", "",
           f"Warm-up errors: {d.get('warm_errors') or 'none'}", ""]
    large, best_large = large_section(d)
    e2e, (e2e_ratios, e2e_memory) = e2e_section(d) if d.get("e2e") else ([], ({}, {}))
    out += ["## Targets (issue 4)", "", "| target | measured | verdict |", "|---|---|---|"]
    for label, sc, factor in M1_TARGETS:
        ratio, kernel, vs_peer = best_m1(d, sc)
        peer = f"; {times(vs_peer)} the best peer" if vs_peer else ""
        where = f" ({kernel}{peer})" if kernel else ""
        out.append(f"| M = 1, 8192^2: {label} | {times(ratio)}{where} | {verdict(ratio, factor)} |")
    for label, sc, base, factor in LARGE_TARGETS:
        b = best_large.get(sc)
        ratio = b[base[:-3]] / b["us"] if b and b.get("us") and b.get(base[:-3]) else None
        where = f" ({b['kernel']})" if ratio is not None else ""
        out.append(f"| M = 2048, 8192^2: {label} | {times(ratio)}{where} | {verdict(ratio, factor)} |")
    for label, variant, factor in E2E_TARGETS:
        ratio = max((v for k, v in e2e_ratios.items() if k.split("/")[0] == variant and v), default=None)
        out.append(f"| end to end, batch 1: {label} | {times(ratio)} (best of its variants) "
                   f"| {verdict(ratio, factor)} |")
    for _, variant, _ in E2E_TARGETS:  # memory within 10% of packed weights + KV cache
        mem = min((v for k, v in e2e_memory.items() if k.split("/")[0] == variant), default=None)
        ok = "not measured" if mem is None else "met" if mem <= 1.1 else f"missed ({mem:.3f})"
        out.append(f"| end to end memory: {variant} peak <= 1.1 (weights + KV) | {fmt(mem, 3)} (best of its variants) "
                   f"| {ok} |")
    out.append("")
    return "\n".join(out + m1_section(d) + small_m_section(d) + large + e2e + sweep_section(d))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kp_json")
    args = ap.parse_args()
    print(report(json.loads(Path(args.kp_json).read_text())))


if __name__ == "__main__":
    main()
