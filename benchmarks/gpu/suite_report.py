"""The GPU suite's markdown report (results.md) from its results.json: ceilings, correctness, kernel tables with
roofline fractions, the issue's targets with verdicts (our best row for each), peers, the decode sweep, where the
time went, and end-to-end decode."""
from __future__ import annotations

import json

from benchmarks.gpu.suite_kernels import OURS
from benchmarks.gpu.suite_plan import SHAPES

TARGETS = [  # (what, scheme, m, (n, k), baseline, factor)
    ("M=1, 8192^2: W4A16 >= 2.5x fp16", "W4A16", 1, (8192, 8192), "torch float16", 2.5),
    ("M=1, 8192^2: W2A16 >= 3.5x fp16", "W2A16", 1, (8192, 8192), "torch float16", 3.5),
    ("M=1, 8192^2: W2A8 >= 3.5x fp16", "W2A8", 1, (8192, 8192), "torch float16", 3.5),
    ("M=1, 8192^2: W8A8 >= 1.8x fp16", "W8A8", 1, (8192, 8192), "torch float16", 1.8),
    ("M=2048: W8A8 >= 0.8x _int_mm", "W8A8", 2048, None, "torch _int_mm", 0.8),
    ("M=2048: W4A8 >= 0.8x _int_mm", "W4A8", 2048, None, "torch _int_mm", 0.8),
    ("M=2048: W4A16 >= 0.7x fp16", "W4A16", 2048, None, "torch float16", 0.7),
    ("M=2048: W2A16 >= 0.7x fp16", "W2A16", 2048, None, "torch float16", 0.7),
]


def render(data: dict) -> str:
    env = data.get("env", {})
    out = [f"# GPU suite: {env.get('gpu', '?')}, {env.get('date', '?')}", "",
           f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
           f"{env.get('sms', '?')} SMs, L2 {env.get('l2_mib', '?')} MiB", ""]
    c = data.get("ceilings")
    if c:
        out += ["## Ceilings measured in this run", "", "| ceiling | value |", "|---|---|",
                f"| device copy bandwidth (read + write) | {c['bandwidth_Bps'] / 1e12:.2f} TB/s |",
                f"| fp16 matmul 8192^3 | {c.get('float16_flops', 0) / 1e12:.0f} TFLOP/s |",
                f"| bf16 matmul 8192^3 | {c.get('bfloat16_flops', 0) / 1e12:.0f} TFLOP/s |",
                f"| int8 torch._int_mm 8192^3 | {c.get('int8_ops', 0) / 1e12:.0f} TOP/s |", ""]
    s = data.get("sass")
    if s:
        out += ["## CUDA binary kernel: tensor-core instructions in the SASS", "", f"`{json.dumps(s.get('mma_ops', s))}`", ""]
    cr = data.get("correctness")
    if cr:
        out += ["## Correctness (vs the float64 reference, outputs poisoned first)", "",
                f"{cr['passed']}/{cr['total']} checks passed.", ""]
        for r in cr["failures"][:30]:
            out.append(f"- FAILED {r}")
        out.append("")
    kr = data.get("kernels")
    if kr and kr.get("rows"):
        out += _render_kernels(kr["rows"])
        out += _render_targets(kr["rows"])
        out += _render_peers(kr["rows"])
        if kr.get("sweep"):
            out += ["## Decode sweep (M = 1, first shape): alternatives to the GEMVs' defaults", "",
                    "The defaults are the grid's `cuda-gemv` and `triton` rows at M = 1.", "",
                    "| scheme | config | us | vs fp16 |", "|---|---|---|---|"]
            for r in kr["sweep"]:
                out.append(f"| {r['scheme']} | {r['config']} | {r.get('us', r.get('error', ''))} | "
                           f"{r.get('vs_fp16', '')} |")
            out.append("")
        if kr.get("blocks"):
            out += ["## Where the kernel section's time went (seconds per block)", "", "| N x K | M | s | spent |",
                    "|---|---|---|---|"]
            out += [f"| {b['n']}x{b['k']} | {b['m']} | {b['seconds']} | {b['spent']} |" for b in kr["blocks"]]
            out.append("")
    e2e = data.get("e2e")
    if e2e and e2e.get("rows"):
        out += _render_e2e_targets(e2e["rows"])
        out += ["## End-to-end decode (random-weight Llama-2-7B shape, CUDA graph per step)", "",
                f"shape: {e2e.get('shape')}", "",
                "| variant | batch | tok/s | vs fp16 | ms/step | prefill s | weights GB | KV GB | peak GB | peak/(weights+KV) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e["rows"]:
            if "error" in r:
                out.append(f"| {r['variant']} | {r['batch']} | error: {r['error'][:80]} |||||||")
                continue
            gb = lambda v: f"{v / 1e9:.2f}" if v else "-"  # noqa: E731
            out.append(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r.get('vs_fp16', '-')} | "
                       f"{r['ms_per_step']:.2f} | {r['prefill_s']:.3f} | {gb(r['weight_bytes'])} | {gb(r['kv_bytes'])} | "
                       f"{gb(r['peak_bytes'])} | {r.get('memory_over_weights_kv', '-')} |")
        out.append("")
    return "\n".join(out) + "\n"


def _render_kernels(rows) -> list[str]:
    out = ["## Kernel timings (median us; x = speed-up over torch fp16; roof = fraction of the memory or "
           "tensor-core roofline, whichever bounds)", ""]
    by_shape = {}
    for r in rows:
        if "us" in r:
            by_shape.setdefault((r["n"], r["k"]), []).append(r)
    for (n, k), rs in by_shape.items():
        ms = sorted({r["m"] for r in rs})
        out += [f"### N={n}, K={k}", "", "| kernel | scheme | " + " | ".join(f"M={m}" for m in ms) + " |",
                "|---|---|" + "---|" * len(ms)]
        keys = []
        for r in rs:
            if (r["kernel"], r["scheme"]) not in keys:
                keys.append((r["kernel"], r["scheme"]))
        for kern, scheme in keys:
            cells = []
            for m in ms:
                hit = [r for r in rs if r["kernel"] == kern and r["scheme"] == scheme and r["m"] == m]
                if hit:
                    h = hit[0]
                    x = f" {h['vs_fp16']}x" if h.get("vs_fp16") else ""
                    cells.append(f"{h['us']:.1f}{x} ({h['roofline_fraction']:.2f} {h['bound'][0]})")
                else:
                    cells.append("")
            out.append(f"| {kern} | {scheme} | " + " | ".join(cells) + " |")
        out.append("")
    return out


E2E_TARGETS = (("W4A16", 2.5), ("W2A8", 3.5))  # batch 1, tokens/s over fp16; memory <= 1.10 (weights + KV)


def _render_e2e_targets(rows) -> list[str]:
    out = ["## End-to-end targets (issue 4, batch 1): tokens/s over fp16, and peak memory over packed weights + "
           "KV cache (<= 1.10)", "", "| variant | vs fp16 (target) | peak/(weights+KV) | both met |", "|---|---|---|---|"]
    b1 = [r for r in rows if r.get("batch") == 1 and "tokens_per_s" in r and r["variant"] != "fp16"]
    for scheme, factor in E2E_TARGETS:
        mine = [r for r in b1 if r["variant"].split("/")[0] == scheme]
        if not mine:
            out.append(f"| {scheme} | not measured (>= {factor}x) | | - |")
        for r in mine:
            v, mem = r.get("vs_fp16"), r.get("memory_over_weights_kv")
            met = v is not None and mem is not None and v >= factor and mem <= 1.10
            out.append(f"| {r['variant']} | {v} (>= {factor}x) | {mem} | {'yes' if met else 'no'} |")
    for r in b1:
        if r["variant"].split("/")[0] not in dict(E2E_TARGETS) and r.get("memory_over_weights_kv"):
            out.append(f"| {r['variant']} | {r.get('vs_fp16')} | {r['memory_over_weights_kv']} | "
                       f"{'(memory) yes' if r['memory_over_weights_kv'] <= 1.10 else '(memory) no'} |")
    return out + [""]


def _render_peers(rows) -> list[str]:
    """'Every config at least as fast as the best peer kernel measured for the same bits'."""
    peer_rows = [r for r in rows if str(r.get("kernel", "")).startswith("gemlite") and "us" in r]
    if not peer_rows:
        return ["## Peers", "", "No peer kernel was measured (carry a GemLite wheel: benchmarks/gpu/fetch_peer_wheels.sh).", ""]
    out = ["## Against the best peer (same scheme, shape and M)", "", "| scheme | N x K | M | ours us | peer us | ours/peer |",
           "|---|---|---|---|---|---|"]
    for p in peer_rows:
        ours = [r["us"] for r in rows if r.get("kernel") in OURS and r.get("scheme") == p["scheme"]
                and r["m"] == p["m"] and r["n"] == p["n"] and r["k"] == p["k"] and "us" in r]
        if ours:
            out.append(f"| {p['scheme']} | {p['n']}x{p['k']} | {p['m']} | {min(ours):.1f} | {p['us']:.1f} | "
                       f"{min(ours) / p['us']:.2f} |")
    return out + [""]




def _render_targets(rows) -> list[str]:
    out = ["## Targets (issue 4)", "", "| target | measured | met |", "|---|---|---|"]
    def find(kernel, scheme, m, n, k):
        hit = [r for r in rows if r.get("kernel") == kernel and r.get("scheme", "").startswith(scheme)
               and r["m"] == m and r["n"] == n and r["k"] == k and "us" in r]
        return min(((r["us"], r["scheme"]) for r in hit), default=(None, None))
    for what, scheme, m, nk, base, factor in TARGETS:
        shapes = [nk] if nk else SHAPES
        parts, met = [], []
        for n, k in shapes:
            ours = [(*find(kern, scheme, m, n, k), kern) for kern in OURS]
            ours = [o for o in ours if o[0]]
            ref = find(base, "W", m, n, k)[0]
            if ours and ref:
                us, label, kern = min(ours)
                speed = ref / us
                parts.append(f"{n}x{k}: {speed:.2f}x ({kern}{', ' + label.split(' ', 1)[1] if ' ' in label else ''})")
                met.append(speed >= factor)
        out.append(f"| {what} | {', '.join(parts) or 'not measured'} | "
                   f"{'yes' if met and all(met) else 'no' if met else '-'} |")
    out.append("")
    return out
