"""What the GPU suite runs (benchmarks/gpu_suite.py): the kernel grid and its block order, the decode sweep, the
correctness cases, the end-to-end runs and the warm-up's launches. Plain data and pure functions, so that the plan is
tested without a GPU (tests/test_gpu_suite.py)."""
from __future__ import annotations

import torch

from abqllm.kernels import cuda_gemv as CG
from abqllm.kernels import kpacked_linear as KL
from abqllm.spec import parse_scheme

WEIGHTS = [("W1", 1, False), ("W2", 2, False), ("W2*", 2, True), ("W3", 3, False), ("W4", 4, False),
           ("W5", 5, False), ("W6", 6, False), ("W7", 7, False), ("W8", 8, False)]
ACTS = [16, 8, 4]
# In priority order (the targets first), in case the time budget cuts the kernel section short.
SHAPES = [(8192, 8192), (4096, 4096), (11008, 4096), (4096, 11008)]
MS = [1, 4, 16, 64, 256, 2048]  # (kernel_blocks orders the blocks: the targets' first)
# The decode sweep (sweep_plan) on these schemes: the GEMVs' untimed alternatives, beside the defaults
SWEEP_SCHEMES = ["W4A16", "W2A16", "W2A8", "W8A8"]
# Per-channel W8A8 and W4A8 (the usual SmoothQuant-style setting) beside the grid's group size, at these M
PC_WEIGHTS, PC_MS = ("W8", "W4"), (1, 2048)
E2E_VARIANTS = ["fp16", "W8A8", "W4A16", "W4A8", "W3A8", "W2A8", "W2*A8"]
E2E_CUDA = ["W4A16", "W2A8", "W8A8", "W4A8"]  # batch 1 with decode on the CUDA GEMV (weights held once)
E2E_KPACKED = ["W4A16", "W2A8"]  # weights held once, every M from the k-packed layout (the Triton kernels)
LLAMA_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # qkv, o, gate_up, down (llama.py)


def kernel_plan(args, cuda: bool):
    """(shapes, ms, weights, acts, gs) that the kernel section times."""
    gs = args.group_size
    if cuda:
        shapes, ms, weights, acts = SHAPES, MS, WEIGHTS, ACTS
        if args.quick:
            shapes, ms = [(8192, 8192), (4096, 4096)], [1, 2048, 16]
            weights = [w for w in WEIGHTS if w[0] in ("W2", "W2*", "W4", "W8")]
    else:
        shapes, ms, acts = [(32, 64)], [1, 3], [16, 8]
        weights = [w for w in WEIGHTS if w[0] in ("W2*", "W4")]
        gs = min(gs, 32) if gs else 0
    return shapes, ms, weights, acts, gs


def sweep_plan(args) -> list[tuple]:
    """(scheme, label, run(layer, x)) of the decode sweep (M = 1, 8192^2, right after that block is timed): the
    untimed alternatives to the defaults of the two GEMVs (cuda_gemv.BLOCKS_PER_SM, kpacked_linear.KpConfig)."""
    if args.quick:
        return []
    out = []
    for scheme in SWEEP_SCHEMES:
        for bps in (2, 8):
            out.append((scheme, f"cuda-gemv {bps} blocks/SM",
                        lambda L, x, b=bps: CG.cuda_gemv(x, **KL.layer_kp_args(L), blocks_per_sm=b)))
        for cfg in (KL.KpConfig(warps_per_sm=32), KL.KpConfig(bn=2048, num_warps=8)):
            out.append((scheme, f"kp_gemv {cfg.bn}x{cfg.bw} {cfg.num_warps} warps, {cfg.warps_per_sm} warps/SM",
                        lambda L, x, c=cfg: KL.kp_gemv(x, **KL.layer_kp_args(L), config=c)))
    return out


def kernel_blocks(shapes, ms) -> list[tuple[int, int, int]]:
    """(n, k, m) in priority order, in case the time budget cuts the section short: the targets' blocks first
    (the first shape at M = 1, every shape at the largest M), then the rest of the first shape, then the others."""
    first, big = shapes[0], max(ms)
    order = [(*first, ms[0])] + [(n, k, big) for n, k in shapes]
    order += [(n, k, m) for n, k in shapes for m in ms]
    seen, out = set(), []
    for b in order:
        if b not in seen:
            seen.add(b)
            out.append(b)
    return out


def correctness_plan(args, cuda: bool) -> list[tuple]:
    """(m, n, k, wname, bits, balanced, a, gs, dtype) checks: every WpAq x A at the timed group size, shape
    class and split (N = 256, K = 4096, M = 1 / 16 / 64), then odd shapes: K = 576 (SmolLM2; unaligned rows for
    odd widths, a last group of 64 at g128) per group and per channel, bf16, symmetric activations."""
    if not cuda:
        return [(m, 24, 96, w, b, bal, a, 32, torch.float16) for w, b, bal in WEIGHTS if w in ("W2*", "W4", "W8")
                for a in (16, 8) for m in (1, 3)]
    gs = args.group_size
    weights = WEIGHTS if not args.quick else [w for w in WEIGHTS if w[0] in ("W2*", "W4", "W8")]
    plan = [(m, 256, 4096, w, b, bal, a, gs, torch.float16) for w, b, bal in weights for a in ACTS for m in (1, 16, 64)]
    for w, b, bal in [x for x in WEIGHTS if x[0] in ("W2*", "W3", "W4", "W8")]:
        for a in (16, 8):
            for m, g, dt in ((1, 128, torch.float16), (33, 0, torch.float16), (5, 128, torch.bfloat16)):
                plan.append((m, 200, 576, w, b, bal, a, g, dt))
    return plan


def e2e_plan(args, cuda: bool) -> list[tuple[int, str]]:
    """(batch, variant) in priority order. A variant is a scheme, 'fp16', or scheme/mode: '/kpacked' holds each
    layer's weights once, in the k-packed layout, and serves every M from it (keep_only_kpacked); '/cuda' does that
    and runs decode on the CUDA GEMV ('cuda-gemv'). The plain scheme runs what `auto` picks."""
    if not cuda:
        return [(1, "fp16"), (1, "W2*A8"), (1, "W4A16/kpacked"), (1, "W4A8/cuda")]
    plan = [(1, v) for v in E2E_VARIANTS] + [(1, f"{v}/cuda") for v in E2E_CUDA]
    if not args.quick:
        plan += [(16, v) for v in E2E_VARIANTS]
    plan += [(1, f"{v}/kpacked") for v in E2E_KPACKED]
    if not args.quick:
        plan += [(16, f"{v}/kpacked") for v in E2E_KPACKED]
    return plan


def warmup_items(args, cuda: bool) -> list[tuple]:
    """Every launch the later steps make, once: (m, n, k, wname, bits, balanced, a, gs, dtype, what), what being
    'timed' (the kernel grid), 'e2e' (the end-to-end runs' shapes), 'checked' (correctness) or a sweep label."""
    shapes, ms, weights, acts, gs = kernel_plan(args, cuda)
    fp16 = torch.float16
    wanted = [(m, n, k, w, b, bal, a, gs, fp16, "timed") for (n, k) in shapes for m in ms
              for w, b, bal in weights for a in acts]
    if cuda:  # the decode steps and prefills of the end-to-end runs
        e2e_ms = [1, 4, 16, args.prompt, 16 * args.prompt]
        wanted += [(m, n, k, w, b, bal, a, gs, fp16, "e2e") for (n, k) in LLAMA_SHAPES for m in e2e_ms
                   for w, b, bal in WEIGHTS if w in ("W8", "W4", "W3", "W2", "W2*") for a in (16, 8)]
    if gs:
        wanted += [(m, n, k, w, int(w[1]), False, 8, 0, fp16, "timed") for (n, k) in shapes for m in ms
                   if m in PC_MS for w in PC_WEIGHTS]
    wanted += [(*c, "checked") for c in correctness_plan(args, cuda)]
    weight = {w: (b, bal) for w, b, bal in WEIGHTS}
    for scheme, label, _ in sweep_plan(args):
        w = scheme.split("A")[0]
        wanted.append((1, *shapes[0], w, *weight[w], parse_scheme(scheme).act.bits, gs, fp16, label))
    return list(dict.fromkeys(wanted))


def warmup_chunks(items: list[tuple], workers: int, args, cuda: bool) -> list[list[tuple]]:
    """One worker per scheme family (same storage width, activation bits and dtype), so that launches sharing compiled
    variants meet in one process and compile once; families are dealt largest first. Each worker goes in the order
    the later steps need its launches, so that a warm-up cut by its timeout leaves the least needed ones to compile
    on first use: the checks, the sweep, then the kernel blocks in their order (the end-to-end decode and batch-1
    prefill shapes after the first five blocks)."""
    families: dict[tuple, list] = {}
    for item in items:  # (storage bits: W2* is stored in 3 bits and runs W3's kernels)
        families.setdefault((item[4] + item[5], item[6], item[8]), []).append(item)
    chunks: list[list] = [[] for _ in range(max(1, min(workers, len(families))))]
    for fam in sorted(families.values(), key=len, reverse=True):
        min(chunks, key=len).extend(fam)
    shapes, ms = kernel_plan(args, cuda)[:2]
    rank = {(n, k, m): i for i, (n, k, m) in enumerate(kernel_blocks(shapes, ms))}

    def priority(item) -> int:
        m, n, k, what = item[0], item[1], item[2], item[9]
        if what == "checked":
            return 0
        if what == "e2e":
            return 7 if m in (1, 4, args.prompt) else 2 + len(rank)
        if what != "timed":
            return 1
        return 2 + rank.get((n, k, m), len(rank))
    return [sorted(c, key=priority) for c in chunks]
