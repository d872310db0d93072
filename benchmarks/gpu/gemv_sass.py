"""Instructions per weight code in the GEMV's sm_90 SASS, per tile config, without a GPU.

Compiles gemv_kernel for sm_90 (Triton ships ptxas and cuobjdump), finds the main K loop (the widest
backward branch) and counts its instructions per code a thread handles per iteration, plus the ones that
signal trouble: SHFL/BAR (cross-thread reductions or layout changes inside the loop), I2F/I2FP (quarter-rate
converts), STL/LDL (spills, counted over the whole kernel). A proxy for speed, not a timing: the first
H100 run put the old M = 1 path at 8.2 instructions per code (one of them I2FP) and 67.5 us for W4A16 at
N = K = 8192, about 3.6x its issue-bound time, so latency and occupancy matter too.

    python benchmarks/gpu/gemv_sass.py --bits 4 --group 128 --act 16 [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from abqllm.kernels import triton_linear as TL  # noqa: E402

CONFIGS = [dict(bn=32, words=32, num_warps=4), dict(bn=64, words=16, num_warps=4), dict(bn=64, words=16, num_warps=2),
           dict(bn=64, words=32, num_warps=2), dict(bn=128, words=16, num_warps=2), dict(bn=128, words=16, num_warps=4),
           dict(bn=32, words=16, num_warps=1), dict(bn=64, words=16, num_warps=1)]


def cuobjdump() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def sass_lines(cubin: bytes) -> list[tuple[int, str]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def opname(ins: str) -> str:
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return ins.split(" ")[0].split(".")[0]


def analyse(bits: int, group: int, act: int, cfg: dict) -> dict:
    c = TL.GemvConfig(**cfg)
    plan = TL.gemv_plan(8192, 8192, bits, group, c, 132)
    codes = c.bn * plan["NG"] * plan["CW"] * plan["PER"] / (32 * c.num_warps)
    return dict(config=cfg, **loop_counts(TL.aot_compile_gemv(8192, 8192, bits, group, act, config=c), codes))


def analyse_qlinear_m1(bits: int, group: int, act: int) -> dict:
    """The same counts for qlinear_kernel's M = 1 path (_tile_gemv) at its default tile, for comparison."""
    cfg = TL._with_split(TL._gpu_decode_config(1, group), 1, 8192, 8192, group, TL.DECODE_PROGRAMS_PER_SM * 132)
    codes = cfg.bn * cfg.bk / (32 * cfg.num_warps)  # one BN x BK tile per iteration
    return dict(config=str(cfg), **loop_counts(TL.aot_compile(1, 8192, 8192, bits, group, act, config=cfg), codes))


def loop_counts(compiled, codes: float) -> dict:
    lines = sass_lines(compiled.asm["cubin"])
    loop = None
    for addr, ins in lines:
        m = re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr and (loop is None or addr - int(m.group(1), 16) > loop[1] - loop[0]):
            loop = (int(m.group(1), 16), addr)
    body = [opname(i) for a, i in lines if loop and loop[0] <= a <= loop[1]]
    every = collections.Counter(opname(i) for _, i in lines)
    inner = collections.Counter(body)
    return dict(codes_per_thread_per_iter=codes, loop_instructions=len(body),
                per_code=round(len(body) / codes, 2) if body else None, shfl=inner["SHFL"], bar=inner["BAR"],
                int_to_float=inner["I2F"] + inner["I2FP"], ffma=inner["FFMA"], spill_ops=every["STL"] + every["LDL"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--act", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = [analyse(a.bits, a.group, a.act, cfg) for cfg in CONFIGS] + [analyse_qlinear_m1(a.bits, a.group, a.act)]
    default = TL.default_gemv_config(a.bits)
    print(f"W{a.bits}A{a.act} g{a.group}, sm_90 SASS of gemv_kernel (default: bn={default.bn}, words={default.words}, "
          f"num_warps={default.num_warps})")
    print("| config | codes/thread/iter | loop instr | per code | SHFL | BAR | I2F | spill ops |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['codes_per_thread_per_iter']:.0f} | {r['loop_instructions']} | {r['per_code']} | "
              f"{r['shfl']} | {r['bar']} | {r['int_to_float']} | {r['spill_ops']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(bits=a.bits, group=a.group, act=a.act, rows=rows), indent=1))


if __name__ == "__main__":
    main()
