"""Count the distinct compiles the GPU suite's warm-up asks of the three main Triton kernels (kp_gemv, qlinear_kernel,
kp_gemm), from their compile-time parameters for every planned launch, without a GPU (132 SMs assumed, as on an
H100). An estimate of the warm-up's work: Triton's own specializations (pointer alignment, integer values) can only
add to it, and the dense path, act_quant and GemLite come on top.

    python benchmarks/gpu/count_warmup_variants.py [--out benchmarks/results/warmup_variants.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from abqllm.kernels import kpacked as KP  # noqa: E402
from abqllm.kernels import kpacked_linear as KL  # noqa: E402
from abqllm.kernels import triton_linear as TL  # noqa: E402
from benchmarks import gpu_suite as GS  # noqa: E402
from benchmarks.gpu import suite_plan as SP  # noqa: E402

SMS = 132


def count() -> dict:
    TL._num_sms = KL._num_sms = lambda index: SMS  # noqa: E731  (no GPU to ask)
    args = GS.parse_args(["--out", "/tmp/unused"])
    items = SP.warmup_items(args, True)
    dev = torch.device("cuda")
    seen = collections.defaultdict(set)
    for (m, n, k, _w, bits, balanced, a, gs, dt, what) in items:
        sb, int_path, sym, bias = bits + balanced, a != 16, m == 5, what == "checked"
        nw = -(-k // KP.segment_length(k, gs)) * KP.words_per_segment(k, gs, sb)
        kp = what == "checked" or m <= KL.KP_MAX_M
        ql = what == "checked" or (what in ("timed", "e2e") and m > KL.KP_MAX_M)
        kg = what == "checked" or (what == "timed" and 1 < m <= 16) or (what == "e2e" and m > 1)
        if kp:
            cfg = KL.default_kp_config(sb, gs, k, n)
            split = KL.kp_plan(m, n, nw, cfg, SMS)[1]
            seen["kp_gemv"].add((tuple(sorted(KL.kp_constexprs(sb, gs, k, n, a, sym, bias, split, cfg).items())),
                                 str(dt), cfg.num_warps))
        if ql:
            cfg = TL.default_config(m, n, k, gs, int_path, dev)
            split = TL.split_plan(k, gs, cfg, int_path)[0]
            kw = -(-k // 32) * sb
            c = TL.qlinear_constexprs(sb, gs, a, sym, bias, dt, split, cfg, False,
                                      aligned=k % 16 == 0 and kw % 4 == 0)
            seen["qlinear_kernel"].add((tuple(sorted(c.items())), cfg.num_warps, cfg.num_stages))
        if kg:
            cfg = KL.default_kp_gemm_config(m, False)
            split = KL.kp_gemm_plan(m, n, nw, cfg.bkw or KL.gemm_bkw(sb, gs, k), cfg, SMS)[1]
            c = KL.kp_gemm_constexprs(sb, gs, k, a, sym, bias, dt, cfg, False, split)
            seen["kp_gemm"].add((tuple(sorted(c.items())), cfg.num_warps, cfg.num_stages))
    return dict(items=len(items), distinct_compiles={k: len(v) for k, v in seen.items()},
                total=sum(len(v) for v in seen.values()), sms=SMS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/warmup_variants.json")
    out = count()
    Path(ap.parse_args().out).write_text(json.dumps(out, indent=1) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
