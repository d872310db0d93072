"""CPU linear kernels (`cpu`) against torch's fp32 F.linear and the `torch` path (dequantize once, cache the
fp32 weight, F.linear), on the default model's shapes and one 4096 x 4096 layer.

    python benchmarks/cpu_kernels.py                                   # defaults below, ~5-10 min on 2 cores
    python benchmarks/cpu_kernels.py --schemes W4A8 --m 1 --threads 1 --shapes q_proj,big
    python benchmarks/cpu_kernels.py --isa avx2,avx512 --m 1,4,16 --threads 1     # one column per ISA

Per (shape, M, threads, kernel): the median wall time of one call after warm-up. Weights are rotated among
copies that together exceed twice the L3 cache (--hot: one copy), as in decode, where every layer's weights
come from memory. GB/s counts the weight bytes a call reads: qweight + scales + zeros for the packed kernels,
the fp32 matrix for F.linear and for the torch path. The load average is recorded before and after: on a
shared machine timings move with it. Writes benchmarks/results/cpu_kernels.json and .md; not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from abqllm.kernels import cpu
from abqllm.kernels.reference import linear_dequant
from abqllm.nn import QuantLinear
from abqllm.spec import parse_scheme

# (name, K = in_features, N = out_features): SmolLM2-135M's linears, and a 7B-sized square one.
SHAPES = [("q_proj", 576, 576), ("k_proj", 576, 192), ("up_proj", 576, 1536), ("down_proj", 1536, 576),
          ("lm_head", 576, 49152), ("big", 4096, 4096)]
SCHEMES = "W4A16,W4A16g64,W4A8,W8A8,W2*A8"


def l3_bytes() -> int:
    try:
        for line in subprocess.run(["lscpu", "-B"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("L3 cache:"):
                return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        pass
    return 32 << 20


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def packed_bytes(layer: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.zeros))


def time_calls(fns, min_s: float, min_reps: int, max_reps: int, start_at: int = 0) -> tuple[list, list]:
    """Wall and thread-CPU seconds of calls cycling through fns (one per weight copy) for at least min_s.
    With one thread the CPU time is what a call costs when the machine is shared (it leaves out time spent
    descheduled); the wall time is what a caller waits."""
    wall, busy, start, i = [], [], time.perf_counter(), start_at
    while len(wall) < max_reps and (len(wall) < min_reps or time.perf_counter() - start < min_s):
        f = fns[i % len(fns)]
        t, c = time.perf_counter(), time.thread_time()
        f()
        wall.append(time.perf_counter() - t)
        busy.append(time.thread_time() - c)
        i += 1
    return wall, busy


def measure(cases: dict, rounds: int, min_s: float) -> dict:
    """Median wall / CPU time per case; the cases take turns in `rounds` rounds, so that a change in the
    machine's load during the run spreads over all of them instead of landing on one."""
    samples = {name: ([], []) for name in cases}
    for name, fns in cases.items():
        for f in fns[:3]:
            f()
    for r in range(rounds):
        for name, fns in cases.items():
            w, c = time_calls(fns, min_s / rounds, max(2, 5 // rounds), 5000, start_at=r * 7919)
            samples[name][0].extend(w)
            samples[name][1].extend(c)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in samples.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--m", default="1,128", help="tokens per call")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--hot", action="store_true", help="one weight copy (cache-resident where it fits)")
    ap.add_argument("--rotate-mb", type=float, default=0,
                    help="rotate weight copies over this many MB instead of 2x L3 (0: 2x L3)")
    ap.add_argument("--isa", default="auto",
                    help="comma list of instruction sets to time the cpu kernels with (scalar, avx2, avx512, auto)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch path (dequantize once + F.linear)")
    ap.add_argument("--min-s", type=float, default=0.6, help="time each case for at least this long")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/cpu_kernels")
    a = ap.parse_args()
    if not cpu.available():
        sys.exit("error: the CPU kernels could not be built here; see the warning above")

    load_before = os.getloadavg()
    target = 1 if a.hot else int(a.rotate_mb * 2**20) if a.rotate_mb else 2 * l3_bytes()
    isa_names = {v: k for k, v in cpu.ISA.items() if k != "auto"}
    isas = [cpu.isa() if v == "auto" else cpu.ISA[v] for v in a.isa.split(",")]
    default_isa = cpu._OPS.isa
    ms = [int(v) for v in a.m.split(",")]
    threads = [int(v) for v in a.threads.split(",")]
    shapes = [s for s in SHAPES if s[0] in a.shapes.split(",")]
    rows = []
    t_start = time.perf_counter()
    for name, k, n in shapes:
        g = torch.Generator().manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        fp_bytes = n * k * 4
        fp_copies = [lin.weight.detach()] + [lin.weight.detach().clone() for _ in range(-(-target // fp_bytes) - 1)]
        layers = {}
        for scheme in a.schemes.split(","):
            q = QuantLinear.from_float(lin, parse_scheme(scheme).layer)
            cps = min(2048, -(-target // packed_bytes(q)))
            layers[scheme] = [q] + [copy.deepcopy(q) for _ in range(cps - 1)]
            for L in layers[scheme]:  # what a first call builds: the row offsets, the torch path's fp32 copy
                if not L.spec.act.is_float:
                    cpu.row_offsets(L.qweight, L.scales, L.zeros, k, L.spec.weight.storage_bits,
                                    L.spec.weight.group_size)
            for L in layers[scheme][: len(fp_copies)]:
                L.dequantized_weight()
        for m in ms:
            x = torch.randn(m, k, generator=g)
            for nt in threads:
                torch.set_num_threads(nt)
                cases = {("fp32", "F.linear"): [lambda w=w: F.linear(x, w) for w in fp_copies]}
                for scheme, qs in layers.items():
                    if not a.no_torch:
                        cases[(scheme, "torch")] = [lambda L=L: linear_dequant(L, x) for L in qs[: len(fp_copies)]]
                    for isa in isas:  # the eager path of QuantLinear with the ISA forced
                        cases[(scheme, "cpu", isa)] = [lambda L=L, isa=isa: (setattr(cpu._OPS, "isa", isa),
                                                                             cpu.linear_cpu(L, x))
                                                       for L in qs]
                res = measure(cases, a.rounds, a.min_s)
                base, base_c = res[("fp32", "F.linear")]
                rows.append(dict(shape=name, k=k, n=n, m=m, threads=nt, scheme="fp32", kernel="F.linear",
                                 median_s=base, cpu_s=base_c if nt == 1 else None, weight_bytes=fp_bytes,
                                 gb_s=fp_bytes / base / 1e9, copies=len(fp_copies)))
                print(f"{name:9s} K{k:5d} N{n:6d} M{m:4d} t{nt}  fp32 F.linear {base * 1e6:10.1f} us", flush=True)
                for scheme, qs in layers.items():
                    q = qs[0]
                    y_torch = linear_dequant(q, x)
                    t_torch, t_torch_c = res[(scheme, "torch")] if not a.no_torch else (None, None)
                    if not a.no_torch:
                        rows.append(dict(shape=name, k=k, n=n, m=m, threads=nt, scheme=scheme, kernel="torch",
                                         median_s=t_torch, cpu_s=t_torch_c if nt == 1 else None,
                                         weight_bytes=fp_bytes, gb_s=fp_bytes / t_torch / 1e9,
                                         copies=len(cases[(scheme, "torch")])))
                    for isa in isas:
                        t_cpu, t_cpu_c = res[(scheme, "cpu", isa)]
                        cpu._OPS.isa = isa
                        y_cpu = cpu.linear_cpu(q, x)
                        diff = ((y_cpu - y_torch).abs().max() / y_torch.abs().max().clamp_min(1e-30)).item()
                        wb = packed_bytes(q)
                        rows.append(dict(shape=name, k=k, n=n, m=m, threads=nt, scheme=scheme, kernel="cpu",
                                         isa=isa_names[isa], median_s=t_cpu, cpu_s=t_cpu_c if nt == 1 else None,
                                         weight_bytes=wb, gb_s=wb / t_cpu / 1e9, copies=len(qs), vs_fp32=base / t_cpu,
                                         vs_torch=t_torch / t_cpu if t_torch else None, max_rel_diff_vs_torch=diff))
                        cpu_t = f" [cpu time {t_cpu_c * 1e6:.1f} vs fp32 {base_c * 1e6:.1f} us]" if nt == 1 else ""
                        vt = f", x{t_torch / t_cpu:5.2f} vs torch path {t_torch * 1e6:.1f} us" if t_torch else ""
                        print(f"{'':9s} {scheme:10s} cpu {isa_names[isa]:6s} {t_cpu * 1e6:10.1f} us "
                              f"({wb / t_cpu / 1e9:5.1f} GB/s, x{base / t_cpu:5.2f} vs fp32{vt}){cpu_t}  diff {diff:.1e}",
                              flush=True)
                    cpu._OPS.isa = default_isa
        del fp_copies, layers
    result = dict(
        command="python " + " ".join(sys.argv), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu_name(), isa=isa_names[default_isa], isas=[isa_names[i] for i in isas], torch=torch.__version__, cores=os.cpu_count(),
        l3_bytes=l3_bytes(), hot=a.hot, rotate_bytes=target, mm_from_m=cpu.MM_FROM_M, load_before=load_before,
        load_after=os.getloadavg(), seconds=time.perf_counter() - t_start, rows=rows)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out.with_suffix('.json')} and .md; load average {load_before} -> {result['load_after']}")


def markdown(r: dict) -> str:
    lines = [f"# CPU kernels: {r['cpu']} ({r['isa']}), torch {r['torch']}", "",
             f"`{r['command']}`, {r['date']}; load average before {tuple(round(v, 2) for v in r['load_before'])}, "
             f"after {tuple(round(v, 2) for v in r['load_after'])}; weights "
             f"{'hot' if r['hot'] else 'rotated over %.0f MB' % (r.get('rotate_bytes', 2 * r['l3_bytes']) / 2**20)}.",
             ""]
    multi = len(r.get("isas", [])) > 1
    cols = list(dict.fromkeys((x["scheme"], x.get("isa")) for x in r["rows"] if x["kernel"] == "cpu"))
    keys = list(dict.fromkeys((x["shape"], x["k"], x["n"], x["m"], x["threads"]) for x in r["rows"]))

    def table(title: str, field: str, keep) -> list[str]:
        out = [title, "", "| shape (K->N) | M | threads | fp32 F.linear | " +
               " | ".join(f"cpu {s}" + (f" {i}" if multi else "") for s, i in cols) + " |",
               "|---|---|---|---|" + "---|" * len(cols)]
        for shape, k, n, m, t in keys:
            if not keep(t):
                continue
            sel = [x for x in r["rows"] if (x["shape"], x["m"], x["threads"]) == (shape, m, t)]
            fp = next(x for x in sel if x["kernel"] == "F.linear")
            cells = []
            for s, i in cols:
                c = next((x for x in sel if x["kernel"] == "cpu" and x["scheme"] == s and x.get("isa") == i), None)
                tq = next((x for x in sel if x["kernel"] == "torch" and x["scheme"] == s), None)
                if c is None:
                    cells.append("")
                    continue
                vt = f" / {tq[field] / c[field]:.2f}x" if tq else ""
                cells.append(f"{c[field] * 1e6:.0f} ({fp[field] / c[field]:.2f}x{vt})")
            out.append(f"| {shape} ({k}->{n}) | {m} | {t} | {fp[field] * 1e6:.0f} | " + " | ".join(cells) + " |")
        return out + [""]

    lines += table("Wall time, median microseconds per call; in brackets: speed-up over fp32 F.linear / over the "
                   "torch path (when timed).", "median_s", lambda t: True)
    lines += table("One thread, CPU time of the calling thread (median us; leaves out time spent descheduled, so it "
                   "moves less with the machine's load).", "cpu_s", lambda t: t == 1)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
