"""Compile every Triton kernel variant the GPU suite launches, for sm_90, on a machine without a GPU.

Triton ships ptxas, so `triton_linear.aot_compile` builds the same launch the suite would make; this script
then reads ptxas's resource report (registers, spill bytes) and the MMA instructions in the PTX. It catches
compile-only errors (the CPU interpreter accepts code the compiler rejects) and register spills before any
GPU time is spent. Writes JSON + a markdown table.

    python benchmarks/gpu/aot_check.py --out out/aot_check [--arch 90] [--quick]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from abqllm.kernels import triton_linear as TL  # noqa: E402

WEIGHTS = [("W1", 1), ("W2", 2), ("W2*", 3), ("W3", 3), ("W4", 4), ("W5", 5), ("W6", 6), ("W7", 7), ("W8", 8)]


def ptxas_report(ptx: str, arch: int) -> dict:
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([str(ptxas), f"-arch={gpu}", "-O3", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    txt = res.stdout + res.stderr
    def num(pat):
        m = re.search(pat, txt)
        return int(m.group(1)) if m else None
    return dict(registers=num(r"Used (\d+) registers"), spill_store_bytes=num(r"(\d+) bytes spill stores"),
                stack_bytes=num(r"(\d+) bytes stack frame"))


def mma_kinds(ptx: str) -> list[str]:
    return sorted(set(re.findall(r"\b((?:wgmma\.mma_async|mma\.sync\.aligned)\.[\w.]+)", ptx)))


def variants(quick: bool):
    shapes = [(1, 4096, 4096), (16, 4096, 4096), (2048, 4096, 4096)]
    acts = [16, 8, 4]
    weights = WEIGHTS if not quick else [w for w in WEIGHTS if w[0] in ("W2*", "W4", "W8")]
    for name, bits in weights:
        for a in acts:
            for m, n, k in shapes:
                for gs in ((128,) if quick else (128, 0)):
                    yield dict(name=f"{name}A{a}g{gs} M{m}", m=m, n=n, k=k, storage_bits=bits, group_size=gs, act_bits=a)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/aot_check")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="W2*, W4, W8 only, groups of 128 only")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton
    rows = []
    for v in variants(args.quick):
        t = time.time()
        name = v.pop("name")
        try:
            ck = TL.aot_compile(**v, arch=args.arch)
            ptx = ck.asm["ptx"]
            row = dict(name=name, ok=True, **ptxas_report(ptx, args.arch), shared_bytes=ck.metadata.shared,
                       mma=mma_kinds(ptx))
        except Exception as e:  # report and go on: one failing variant must not hide the others
            row = dict(name=name, ok=False, error=f"{type(e).__name__}: {str(e)[-400:]}")
        row["compile_s"] = round(time.time() - t, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for bits in (2, 3, 4, 5, 6, 7, 8):
        for sym in (False, True):
            name = f"act_quant A{bits}{'sym' if sym else ''}"
            try:
                ck = TL.aot_compile_act_quant(4096, bits, sym, arch=args.arch)
                rows.append(dict(name=name, ok=True, **ptxas_report(ck.asm["ptx"], args.arch),
                                 approx_div="div.full" in ck.asm["ptx"]))
            except Exception as e:
                rows.append(dict(name=name, ok=False, error=f"{type(e).__name__}: {str(e)[-400:]}"))
            print(json.dumps(rows[-1]), flush=True)
    meta = dict(triton=triton.__version__, torch=torch.__version__, arch=args.arch, date=time.strftime("%Y-%m-%d"))
    (out / "aot_check.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Triton kernels compiled for sm_{args.arch} (triton {triton.__version__}, {meta['date']})", "",
             "| variant | ok | registers | spill bytes | shared | MMA |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {'yes' if r['ok'] else 'NO: ' + r.get('error', '')[:80]} | {r.get('registers', '')} "
                     f"| {r.get('spill_store_bytes', '')} | {r.get('shared_bytes', '')} | {' '.join(r.get('mma', []))} |")
    (out / "aot_check.md").write_text("\n".join(lines) + "\n")
    bad = [r["name"] for r in rows if not r["ok"]]
    spills = [r["name"] for r in rows if r.get("spill_store_bytes")]
    print(f"{len(rows)} variants, {len(bad)} failed {bad}, {len(spills)} spill {spills}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
