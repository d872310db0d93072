"""Instructions per code in the K loop of the CUDA decode GEMV (abqllm/kernels/cuda/abq_gemv.cu), from its sm_90
SASS, compiled here with nvcc (no GPU needed).

    python benchmarks/gpu/cuda_gemv_sass.py [--out benchmarks/results/cuda_gemv_sass.json]

A proxy, not a timing. For each kernel the main loop is the backward branch that encloses the 16-byte weight
loads (LDG.E.EF.128). `loop_per_code` counts every instruction in it, the rarely taken group flush included;
`hot_per_code` leaves out the branch-free blocks that forward branches skip when no group starts (those holding the
scale and zero-point loads) and, on the dp4a path, the activation-offset dp4a (those holding the 0x1010101 dp4a),
which only 8-bit asymmetric activations run.
Codes per iteration: UNROLL word rows x 4 columns x 32 / BITS codes, times ROWS activation rows.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from abqllm.kernels import cuda as CU  # noqa: E402
from abqllm.kernels import cuda_gemv as CG  # noqa: E402
from benchmarks.gpu.gemv_sass import cuobjdump  # noqa: E402

KERNEL = re.compile(r"Function : (_ZN6kpgemv11gemv_kernelILi(\d)ELb([01])ELi(\d)EEEvNS_4ArgsE)")


def functions(sass: str) -> dict[tuple[int, bool, int], list[tuple[int, str]]]:
    out, key = {}, None
    for line in sass.splitlines():
        m = KERNEL.search(line)
        if m:
            key = (int(m.group(2)), m.group(3) == "1", int(m.group(4)))
            out[key] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and key is not None:
            out[key].append((int(m.group(1), 16), m.group(2).strip()))
    return out


def target(ins: str) -> int | None:
    m = re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", ins)
    return int(m.group(1), 16) if m else None


def counts(lines: list[tuple[int, str]], codes: int) -> dict:
    loads = [a for a, i in lines if "LDG.E.EF.128" in i]
    loop = max(((target(i), a) for a, i in lines if target(i) is not None and target(i) < a
                and any(target(i) <= x <= a for x in loads)), key=lambda r: r[1] - r[0])
    body = [(a, i) for a, i in lines if loop[0] <= a <= loop[1]]
    cold = set()
    for a, i in body:  # forward branches over cold regions
        t = target(i)
        if t is None or t <= a or t > loop[1]:
            continue
        region = [(b, j) for b, j in body if a < b < t]
        if any("BRA" in j for _, j in region):  # an exit over later words (the loop's break), not a cold block
            continue
        if any(("LDG" in j and ".128" not in j) or ("IDP" in j and "0x1010101" in j) for _, j in region):
            cold.update(b for b, _ in region)
    hot = [i for a, i in body if a not in cold]
    return dict(codes_per_iteration=codes, loop_instructions=len(body), loop_per_code=round(len(body) / codes, 2),
                hot_instructions=len(hot), hot_per_code=round(len(hot) / codes, 2),
                dp4a=sum("IDP" in i for i in hot), ffma=sum(i.startswith("FFMA") for i in hot))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cuda_gemv_sass.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "abq_gemv.cubin"
        cmd = [CU.find_nvcc(), "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-cubin", str(CG.SOURCE),
               "-o", str(cubin)]
        subprocess.run(cmd, check=True, capture_output=True)
        sass = subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run([cuobjdump(), "-res-usage", str(cubin)], check=True, capture_output=True,
                               text=True).stdout
    regs = {}
    for name, reg in re.findall(r"Function (_ZN6kpgemv\w+):\s*\n?\s*REG:(\d+)", usage):
        m = KERNEL.search("Function : " + name)
        if m:
            regs[(int(m.group(2)), m.group(3) == "1", int(m.group(4)))] = int(reg)
    rows = []
    for (bits, dp4a, nrows), lines in sorted(functions(sass).items()):
        codes = CG.UNROLL * 4 * (32 // bits) * nrows
        r = dict(bits=bits, path="dp4a" if dp4a else "float", rows=nrows, registers=regs.get((bits, dp4a, nrows)),
                 spills="LOCAL:0" not in usage, **counts(lines, codes))
        rows.append(r)
        print(f"W{bits} {r['path']:5s} rows {nrows}: hot {r['hot_per_code']} a code-row "
              f"(loop {r['loop_per_code']}), {r['registers']} registers", flush=True)
    Path(args.out).write_text(json.dumps(dict(command="python benchmarks/gpu/cuda_gemv_sass.py", arch="sm_90",
                                              nvcc=" ".join(cmd[:5]), rows=rows), indent=1))


if __name__ == "__main__":
    main()
