"""Instructions per code in the K loop of kp_gemv_kernel, from its sm_90 SASS, compiled here without a GPU.

    python benchmarks/gpu/kp_sass.py [--out benchmarks/results/kp_sass.json]
A proxy, not a timing: the loop's instruction count over the codes one thread expands per iteration, plus the
shuffles, barriers and spills in it (benchmarks/gpu/gemv_sass.py does the same for the older kernels).
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
from abqllm.kernels import kpacked_linear as KL  # noqa: E402
from benchmarks.gpu import gemv_sass as S  # noqa: E402

CASES = [(1, 128, 16), (2, 128, 16), (2, 128, 8), (3, 128, 8), (4, 128, 16), (4, 0, 16), (4, 128, 8), (5, 128, 16),
         (8, 128, 8)]
# (bn, bw, warps[, prefetch]); None = the default tile
TILES = [None, (1024, 4, 4), (2048, 4, 8), (1024, 8, 4), (256, 8, 1), (2048, 4, 4), (2048, 2, 4), (1024, 4, 4, True)]


def registers(compiled) -> int:
    """Registers per thread of the compiled kernel (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([S.cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kp_sass.json")
    args = ap.parse_args()
    import triton
    rows = []
    for bits, gs, act in CASES:
        for tile in TILES:
            if tile is None:
                cfg = KL.default_kp_config(bits, gs, 8192, 8192)
            else:
                cfg = KL.KpConfig(bn=tile[0], bw=tile[1], num_warps=tile[2], prefetch=len(tile) > 3)
            ck = KL.aot_compile_kp(1, 8192, 8192, bits, gs, act, config=cfg)
            codes = cfg.bn * cfg.bw * (32 // bits) / (32 * cfg.num_warps)
            r = S.loop_counts(ck, codes)
            regs = registers(ck)
            rows.append(dict(scheme=f"W{bits}A{act}", group=gs, default=tile is None, bn=cfg.bn, bw=cfg.bw,
                             warps=cfg.num_warps, prefetch=cfg.prefetch, registers=regs, **r))
            print(f"W{bits}A{act} g{gs} {cfg.bn}x{cfg.bw} w{cfg.num_warps}{' prefetch' if cfg.prefetch else ''}"
                  f"{' (default)' if tile is None else ''}: {r['per_code']} per code, {regs} registers, "
                  f"shfl {r['shfl']}, bar {r['bar']}, spills {r['spill_ops']}", flush=True)
    Path(args.out).write_text(json.dumps(dict(triton=triton.__version__, arch="sm_90", n=8192, k=8192, rows=rows),
                                         indent=1))


if __name__ == "__main__":
    main()
