"""The k-packed kernels on a GPU in one call: GEMV correctness, M = 1 timings against torch fp16, GemLite (if carried)
and the older qlinear_kernel path, a tile sweep, small-M crossover, kp_gemm vs qlinear_kernel vs the dense path
(kernels/dense_prefill.py) vs cuBLAS/_int_mm at M = 16 and 2048, end-to-end decode at batch 1 (also with every M on
the k-packed layout).

    python benchmarks/gpu/kp_check.py --out DIR [--budget-s 420] [--lean]
    python benchmarks/gpu/kp_check.py --out DIR --cpu    # no GPU: every section on tiny shapes in Triton's
                                                         # interpreter (~2 min), to check the script itself
Writes DIR/kp.json after every section (a run cut short keeps what it measured) and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

CPU = "--cpu" in sys.argv
if CPU:  # before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from abqllm.kernels import cuda_gemv as CG  # noqa: E402
from abqllm.kernels import dense_prefill as DP  # noqa: E402
from abqllm.kernels import kpacked_linear as KL  # noqa: E402
from abqllm.kernels import triton_linear as TL  # noqa: E402
from abqllm.kernels.reference import linear_reference  # noqa: E402
from abqllm.quant import primitives as P  # noqa: E402
from abqllm.spec import parse_scheme  # noqa: E402
from benchmarks import gpu_suite as GS  # noqa: E402
from benchmarks.gpu import llama, peers  # noqa: E402

WIDTHS = ["W1", "W2", "W2*", "W3", "W4", "W5", "W6", "W7", "W8"]
SHAPES = [(8192, 8192), (4096, 4096), (11008, 4096), (4096, 11008)]
SWEEP_SCHEMES = ["W4A16", "W2A16", "W8A8", "W2A8", "W3A8"]
# Run 1 (2026-11-28 14:30 UTC) swept 1-warp tiles, 2 and 4 warps: 1024 x 4, 4 warps won everywhere but W3.
# Run 2 sweeps around it: resident warps per SM (split-K), 8 warps, taller and shorter tiles.
SWEEP = [dict(bn=1024, bw=4, num_warps=4, warps_per_sm=16), dict(bn=1024, bw=4, num_warps=4, warps_per_sm=32),
         dict(bn=1024, bw=4, num_warps=4, warps_per_sm=64), dict(bn=2048, bw=4, num_warps=8),
         dict(bn=1024, bw=8, num_warps=4), dict(bn=1024, bw=2, num_warps=4), dict(bn=512, bw=4, num_warps=2),
         dict(bn=1024, bw=1, num_warps=4),
         # 16 columns a thread: fewer instructions per code in the SASS (W2A16 3.73 vs 4.04, 85 registers; W1A16
         # spills there), benchmarks/results/kp_sass.json
         dict(bn=2048, bw=4, num_warps=4), dict(bn=2048, bw=2, num_warps=4),
         # the next tile's words loaded before this one is computed (two tiles in flight per thread)
         dict(bn=1024, bw=4, num_warps=4, prefetch=True), dict(bn=2048, bw=4, num_warps=4, prefetch=True),
         # Run 3 (not yet run): waves. 80 registers (W4, W8) fit 6 four-warp programs per SM, 119-128 (W2) fit 4:
         # 24 resident warps is one full wave for the former; fewer, longer programs with the next tile in flight
         dict(bn=1024, bw=4, num_warps=4, warps_per_sm=24),
         dict(bn=1024, bw=4, num_warps=4, warps_per_sm=8, prefetch=True),
         dict(bn=1024, bw=4, num_warps=4, warps_per_sm=16, prefetch=True)]
E2E_VARIANTS = ["fp16", "W4A16", "W2A8", "W8A8", "W4A8", "W3A8", "W2*A8", "W2A16", "W4A16/kpacked", "W2A8/kpacked",
                "W4A16/cuda", "W2A8/cuda", "W8A8/cuda", "W2A16/cuda"]  # /cuda: decode on the CUDA GEMV (cuda_gemv.py)
CUDA_BITS = CG.BITS  # the storage widths cuda_gemv serves (all)
SECTIONS = ("correctness", "timings", "sweep", "small_m", "large_m", "e2e")
T0 = time.time()


def S(v: int) -> int:
    """A size as given on the GPU; 1/32 of it (at least 32) in the CPU dry run."""
    return v if not CPU else max(32, v // 32)


def M(m: int) -> int:
    return m if not CPU else min(m, 64)


def sync():
    if not CPU:
        torch.cuda.synchronize()


def mem(kind: str) -> int:
    if CPU:
        return 0
    return {"peak": torch.cuda.max_memory_allocated, "now": torch.cuda.memory_allocated}[kind]()


def mem_reset():
    if not CPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def layer(scheme, n, k, dev, seed=0, gs=128):
    qs = parse_scheme(scheme + (f"g{gs}" if gs else ""))
    return llama.random_quant_linear(k, n, qs.layer, dev, seed=seed)


def kp_call(L, x, cfg=None):
    return KL.kp_gemv(x, **KL.layer_kp_args(L), config=cfg)


def cuda_call(L, x, blocks_per_sm=CG.BLOCKS_PER_SM, fuse=True):
    return CG.cuda_gemv(x, **KL.layer_kp_args(L), blocks_per_sm=blocks_per_sm, fuse_act_quant=fuse, emulate=CPU)


def _warm(items):
    dev = torch.device("cuda")
    errs = []
    for item in items:
        try:
            if item[0] == "gemm":  # kp_gemm, qlinear_kernel and the dense path at this M
                _, scheme, n, k, m = item
                name_, _, pc = scheme.partition("/")
                L = layer(name_, n, k, dev, gs=0 if pc else 128)
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                KL.kp_gemm(x, **KL.layer_kp_args(L))
                TL.qlinear(x, **TL.layer_args(L))
                DP.dense_qlinear(x, **KL.layer_kp_args(L))
                continue
            scheme, n, k, cfg, gs, m = item
            L = layer(scheme, n, k, dev, gs=gs)
            kp_call(L, torch.randn(m, k, device=dev, dtype=torch.float16), cfg)
        except Exception as e:  # noqa: BLE001
            errs.append(f"{item}: {type(e).__name__}: {e}"[-300:])
    sync()
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--lean", action="store_true", help="fewer correctness cases (fp16 only, g128 only)")
    ap.add_argument("--cpu", action="store_true", help="dry run on tiny shapes in Triton's interpreter")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}, run in the order given (the budget cuts "
                    "the last ones first); the warm-up and the ceilings always run")
    args = ap.parse_args()
    chosen = set(args.sections.split(","))
    if not chosen <= set(SECTIONS):
        ap.error(f"unknown sections {sorted(chosen - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    want = chosen.__contains__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targs = argparse.Namespace(calls=20, replays=7)
    dev = torch.device("cpu" if CPU else "cuda")
    res = dict(gpu="cpu (Triton interpreter dry run)" if CPU else torch.cuda.get_device_name(0),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), torch=torch.__version__,
               sms=0 if CPU else torch.cuda.get_device_properties(0).multi_processor_count)
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass
    res["peer"] = peers.available()
    if not CPU:  # build the CUDA GEMV once here, not in every warm-up worker
        t = time.time()
        try:
            CG.library(torch.device("cuda"))
            res["cuda_gemv_build_s"] = round(time.time() - t, 1)
        except Exception as e:  # noqa: BLE001
            res["cuda_gemv_build_error"] = f"{type(e).__name__}: {e}"[-500:]
    save = lambda: (out / "kp.json").write_text(json.dumps(res, indent=1, default=str))  # noqa: E731
    left = lambda: args.budget_s - (time.time() - T0)  # noqa: E731

    # ---- compile every variant in parallel worker processes (fills Triton's disk cache)
    schemes = [w + a for w in WIDTHS for a in (("A16", "A8") if args.lean else ("A16", "A8", "A4"))]
    shapes = [(S(n), S(k)) for n, k in SHAPES]
    items = [(s, n, k, None, 128, 1) for s in schemes for (n, k) in shapes] if want("timings") else []
    items += [(s, 200, 4096, None, 128, 1) for s in schemes] if want("correctness") else []
    if not args.lean and want("correctness"):
        items += [(s, 200, k, None, gs, 1) for s in schemes for gs, k in ((0, 576), (64, 1000))]
    items += [(s, 8192, 8192, KL.KpConfig(**c), 128, 1) for s in SWEEP_SCHEMES for c in SWEEP] if want("sweep") else []
    if want("small_m"):
        items += [(s, 8192, 8192, None, 128, m) for s in ("W4A16", "W2A8", "W8A8") for m in (2, 4, 8)]
    gemm_items = [(s, n, k, m) for s in ("W4A16", "W8A8", "W4A8", "W2A16", "W3A16", "W2A8", "W8A8/pc", "W4A8/pc")
                  for m, (n, k) in ((2048, (8192, 8192)), (16, (8192, 8192)), (128, (4096, 4096)))]
    items += [("gemm",) + it for it in gemm_items] if want("large_m") else []
    chunks = [items[i::14] for i in range(14)]
    if CPU:  # nothing to compile in the interpreter
        chunks = []
    with mp.get_context("spawn").Pool(14 if chunks else 1) as pool:
        try:
            res["warm_errors"] = [e for es in pool.map_async(_warm, chunks).get(timeout=150) for e in es]
        except mp.TimeoutError:
            res["warm_errors"] = ["warm-up timed out"]
    log(f"warm-up: {len(items)} launches, errors: {res['warm_errors'][:3]}")

    # ---- ceilings
    res["ceilings"] = GS.section_ceilings(dev, targs)
    log(f"ceilings: {res['ceilings']}")

    def timed(fns):
        return GS.time_fn(fns, targs, not CPU)["s"] * 1e6

    def weight_bytes(qs, n, k, gs=128):
        return n * k * qs.weight.storage_bits / 8 + n * (k // (gs or k)) * 3

    def section_correctness():
        # ---- correctness vs the float64 reference, outputs poisoned with NaN, workspace zero afterwards
        rows = []
        for scheme in schemes:
            odd = () if args.lean else ((0, S(576) + 8, 1), (64, S(1000) + 40, 3))
            for gs, k, m in ((128, S(4096), 1),) + odd:
                qs = parse_scheme(scheme + (f"g{gs}" if gs else ""))
                L = llama.random_quant_linear(k, 200, qs.layer, "cpu", seed=k)
                L.bias = torch.randn(200).half()
                for dt in (torch.float16,) if args.lean else (torch.float16, torch.bfloat16):
                    x = (torch.randn(m, k) * 2 + 0.3).to(dt)
                    ref = linear_reference(L, x.double())
                    Lg = GS._to(L, dev)
                    kernels = [("kp_gemv", lambda o: KL.kp_gemv(x.to(dev), **KL.layer_kp_args(Lg), out=o))]
                    if qs.weight.storage_bits in CUDA_BITS:
                        kernels.append(("cuda_gemv", lambda o: CG.cuda_gemv(x.to(dev), **KL.layer_kp_args(Lg), out=o,
                                                                            emulate=CPU)))
                    for kname, run in kernels:
                        o = torch.full((m, 200), float("nan"), dtype=dt, device=dev)
                        try:
                            run(o)
                            rows.append(dict(scheme=scheme, gs=gs, k=k, m=m, dtype=str(dt), kernel=kname,
                                             **GS._check(o, ref, dt)))
                        except Exception as e:  # noqa: BLE001
                            rows.append(dict(scheme=scheme, gs=gs, k=k, m=m, kernel=kname, ok=False,
                                             error=f"{type(e).__name__}: {e}"[-300:]))
        # the dense prefill path at M = 300: float GEMM (bound widened by fp16 rounding of the weights and the
        # fake-quantized activations) and, per channel at A8, torch._int_mm with the integer epilogue
        for scheme, gs in (("W4A16", 128), ("W2A16", 128), ("W3A8", 128), ("W8A8", 0), ("W4A8", 0), ("W2*A8", 0)):
            k, m = S(4096), 300
            qs = parse_scheme(scheme + (f"g{gs}" if gs else ""))
            L = llama.random_quant_linear(k, 200, qs.layer, "cpu", seed=k + 1)
            L.bias = torch.randn(200).half()
            x = (torch.randn(m, k) * 2 + 0.3).half()
            ref = linear_reference(L, x.double())
            xf = x.double()
            if not qs.act.is_float:
                xf = P.fake_quant_act(xf, qs.act, *L.act_qparams(xf))
            slack = 2 * 2.0 ** -11 * (xf.abs() @ L.dequantized_weight(torch.float64).abs().T)
            o = torch.full((m, 200), float("nan"), dtype=torch.float16, device=dev)
            try:
                DP.dense_qlinear(x.to(dev), **KL.layer_kp_args(GS._to(L, dev)), out=o)
                rows.append(dict(scheme=scheme, gs=gs, k=k, m=m, dtype="torch.float16", kernel="dense",
                                 **GS._check(o, ref, torch.float16, slack)))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(scheme=scheme, gs=gs, k=k, m=m, kernel="dense", ok=False,
                                 error=f"{type(e).__name__}: {e}"[-300:]))
        ws = KL._WORKSPACE.get(dev) or KL._WORKSPACE.get(torch.device("cuda", 0))
        res["workspace_zero_after"] = None if ws is None else bool((ws[0] == 0).all() and (ws[1] == 0).all())
        res["correctness"] = rows
        log(f"correctness: {sum(r['ok'] for r in rows)}/{len(rows)}; workspace zero: {res['workspace_zero_after']}; "
            f"failures: {[r for r in rows if not r['ok']][:3]}")
        save()

    def section_timings():
        # ---- M = 1 timings
        res["timings"] = []
        for si, (n, k) in enumerate(shapes[:2] if args.lean or CPU else shapes):
            c = GS.copies_needed(n * k * 2, not CPU)
            ws_ = [torch.randn(n, k, device=dev, dtype=torch.float16) for _ in range(c)]
            xs = [torch.randn(1, k, device=dev, dtype=torch.float16) for _ in range(c)]
            fp16 = timed([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws_, xs)])
            del ws_
            res["timings"].append(dict(kernel="torch fp16", n=n, k=k, us=fp16, gbps=n * k * 2 / fp16 / 1e3))
            for scheme in ([w + a for w in WIDTHS for a in ("A16", "A8")] + (["W4A4", "W2A4"] if si == 0 else [])):
                if left() < 120:
                    break
                qs = parse_scheme(scheme + "g128")
                c = GS.copies_needed(n * k * qs.weight.storage_bits // 8, not CPU)
                Ls = [layer(scheme, n, k, dev, seed=i) for i in range(c)]
                xs = [torch.randn(1, k, device=dev, dtype=torch.float16) for _ in range(c)]
                for L in Ls:
                    KL.layer_kpacked(L)
                kinds = [("kp_gemv", lambda L, x: kp_call(L, x))]
                if qs.weight.storage_bits in CUDA_BITS and qs.act.bits in (16, 8):
                    kinds.append(("cuda_gemv", lambda L, x: cuda_call(L, x)))
                if si == 0 and qs.act.bits == 8:  # what quantizing x inside the GEMV saves: act_quant's launch
                    kinds.append(("cuda_gemv + act_quant", lambda L, x: cuda_call(L, x, fuse=False)))
                if si == 0 and scheme in ("W4A16", "W2A16", "W8A8", "W2A8"):
                    kinds.append(("old qlinear_kernel", lambda L, x: TL.qlinear(x, **TL.layer_args(L))))
                for name, f in kinds:
                    try:
                        us = timed([lambda L=L, x=x, f=f: f(L, x) for L, x in zip(Ls, xs)])
                        res["timings"].append(dict(kernel=name, scheme=scheme, n=n, k=k, us=us, vs_fp16=fp16 / us,
                                                   gbps=weight_bytes(qs, n, k) / us / 1e3))
                    except Exception as e:  # noqa: BLE001
                        res["timings"].append(dict(kernel=name, scheme=scheme, n=n, k=k, error=str(e)[-300:]))
                if qs.weight.balanced is False and si < 2:
                    pr = peers.time_peer(scheme, qs.weight.bits, False, qs.act.bits, 128, 1, n, k, c, dev,
                                         lambda fns: GS.time_fn(fns, targs, not CPU))
                    if pr and "s" in pr:
                        res["timings"].append(dict(kernel=pr["kernel"], scheme=scheme, n=n, k=k, us=pr["s"] * 1e6,
                                                   vs_fp16=fp16 / (pr["s"] * 1e6)))
                del Ls
            log(f"timings {n}x{k} done")
            save()

    def section_sweep():
        # ---- tile sweep at N = K = 8192
        res["sweep"] = []
        n = k = S(8192)
        for scheme in SWEEP_SCHEMES:
            qs = parse_scheme(scheme + "g128")
            c = GS.copies_needed(n * k * qs.weight.storage_bits // 8, not CPU)
            Ls = [layer(scheme, n, k, dev, seed=i) for i in range(c)]
            xs = [torch.randn(1, k, device=dev, dtype=torch.float16) for _ in range(c)]
            for cd in SWEEP:
                if left() < 80:
                    break
                cfg = KL.KpConfig(**cd)
                try:
                    us = timed([lambda L=L, x=x: kp_call(L, x, cfg) for L, x in zip(Ls, xs)])
                    res["sweep"].append(dict(scheme=scheme, config=asdict(cfg), us=us))
                except Exception as e:  # noqa: BLE001
                    res["sweep"].append(dict(scheme=scheme, config=asdict(cfg), error=str(e)[-200:]))
            for bps in (2, 4, 8) if qs.weight.storage_bits in CUDA_BITS else ():  # the CUDA GEMV's split
                if left() < 80:
                    break
                cfg = dict(kernel="cuda_gemv", blocks_per_sm=bps)
                try:
                    us = timed([lambda L=L, x=x: cuda_call(L, x, bps) for L, x in zip(Ls, xs)])
                    res["sweep"].append(dict(scheme=scheme, config=cfg, us=us))
                except Exception as e:  # noqa: BLE001
                    res["sweep"].append(dict(scheme=scheme, config=cfg, error=str(e)[-200:]))
            del Ls
        log("sweep done")
        save()

    def section_small_m():
        # ---- small M at N = K = 8192: where the GEMVs stop paying against kp_gemm (16-row tensor-core tiles with
        # split-K), qlinear_kernel's dot path and cuBLAS fp16. kp_gemv streams the weights once a row; cuda_gemv
        # once a block of up to 4 rows.
        res["small_m"] = []
        n = k = S(8192)
        for scheme in ("W4A16", "W2A8", "W8A8"):
            qs = parse_scheme(scheme + "g128")
            c = GS.copies_needed(n * k * qs.weight.storage_bits // 8, not CPU)
            Ls = [layer(scheme, n, k, dev, seed=i) for i in range(c)]
            wf = [torch.randn(n, k, device=dev, dtype=torch.float16) for _ in range(min(c, 2))]
            for m in (1, 2, 4, 8):
                if left() < 90:
                    break
                xs = [torch.randn(m, k, device=dev, dtype=torch.float16) for _ in range(c)]
                r = dict(scheme=scheme, m=m)
                r["fp16_us"] = timed([lambda w=w, x=x: F.linear(x, w) for w, x in zip(wf, xs)])
                r["kp_us"] = timed([lambda L=L, x=x: kp_call(L, x) for L, x in zip(Ls, xs)])
                r["cuda_gemv_us"] = timed([lambda L=L, x=x: cuda_call(L, x) for L, x in zip(Ls, xs)])
                r["qlinear_us"] = timed([lambda L=L, x=x: TL.qlinear(x, **TL.layer_args(L)) for L, x in zip(Ls, xs)])
                r["kp_gemm_us"] = timed([lambda L=L, x=x: KL.kp_gemm(x, **KL.layer_kp_args(L)) for L, x in zip(Ls, xs)])
                res["small_m"].append(r)
            del Ls, wf
        log(f"small M: {res['small_m']}")
        save()

    def section_large_m():
        # ---- M = 16 and M = 2048: kp_gemm (k-packed, tensor cores) vs qlinear_kernel (bitstream) vs cuBLAS / _int_mm
        res["large_m"] = []
        for m, (n, k) in ((2048, (8192, 8192)), (16, (8192, 8192)), (2048, (4096, 11008))):
            m, n, k = M(m), S(n), S(k)
            if left() < 70:
                break
            xs = [torch.randn(m, k, device=dev, dtype=torch.float16) for _ in range(2)]
            wf = [torch.randn(n, k, device=dev, dtype=torch.float16) for _ in range(2)]
            fp16 = timed([lambda w=w, x=x: F.linear(x, w) for w, x in zip(wf, xs)])
            del wf
            row = dict(m=m, n=n, k=k, fp16_us=fp16, fp16_tflops=2 * m * n * k / fp16 / 1e6)
            a8 = torch.randint(-128, 127, (m, k), device=dev, dtype=torch.int8)
            b8 = torch.randint(-128, 127, (n, k), device=dev, dtype=torch.int8)
            try:
                row["int_mm_us"] = timed([lambda: torch._int_mm(a8, b8.t())])
            except RuntimeError as e:  # (the CPU build may lack it for some sizes)
                row["int_mm_error"] = str(e)[-200:]
            del a8, b8
            # "/pc": per-channel weights, which the dense path serves with torch._int_mm at A8
            for scheme in ("W4A16", "W8A8", "W4A8", "W2A16", "W3A16", "W8A8/pc", "W4A8/pc"):
                name_, _, pc = scheme.partition("/")
                Ls = [layer(name_, n, k, dev, seed=i, gs=0 if pc else 128) for i in range(2)]
                for L in Ls:
                    KL.layer_kpacked(L)
                for name, f in (("kp_gemm", lambda L, x: KL.kp_gemm(x, **KL.layer_kp_args(L))),
                                ("qlinear", lambda L, x: TL.qlinear(x, **TL.layer_args(L))),
                                ("dense", lambda L, x: DP.dense_qlinear(x, **KL.layer_kp_args(L)))):
                    try:
                        row[f"{scheme} {name}_us"] = timed([lambda L=L, x=x, f=f: f(L, x) for L, x in zip(Ls, xs)])
                    except Exception as e:  # noqa: BLE001
                        row[f"{scheme} {name}_error"] = str(e)[-200:]
                # the dense path's expansion alone (int8 where it takes torch._int_mm)
                int8 = bool(pc) and parse_scheme(name_).act.bits != 16 and DP.int_mm_ok(m, n, k)
                kps = [KL.layer_kpacked(L) for L in Ls]
                row[f"{scheme} expand_us"] = timed([lambda p=p: DP.expand_kpacked(
                    p.qweight_t, p.scales_t, p.zeros_t, k, p.bits, p.group_size, torch.int8 if int8 else torch.float16)
                    for p in kps])
                del Ls, kps
            res["large_m"].append(row)
            log(f"large M {m} {n}x{k}: " + ", ".join(f"{a}={b:.1f}" for a, b in row.items() if a.endswith("_us")))
            save()

    def section_e2e():
        # ---- end to end, batch 1 (decode steps take the k-packed GEMV through the 'triton' kernel)
        res["e2e"] = []
        prompt, new = (128, 256) if not CPU else (8, 4)
        shape = llama.Shape(max_seq=prompt + new) if not CPU else llama.Shape(dim=64, n_layers=2, n_heads=4, ffn=160,
                                                                              vocab=256, max_seq=prompt + new)
        # (no /cuda variants in the CPU dry run: the 'cuda-gemv' kernel serves CUDA tensors only)
        for variant in [v for v in E2E_VARIANTS if not (CPU and v.endswith("/cuda"))]:
            if left() < 20:
                break
            scheme, _, kernel = variant.partition("/")
            spec = None if variant == "fp16" else parse_scheme(scheme + "g128").layer
            mem_reset()
            try:
                model = llama.Llama(shape, spec, 1, dev)
                released = KL.keep_only_kpacked(model) if kernel else 0  # every M on the k-packed layout, weights once
                if kernel == "cuda":  # decode rows on the CUDA GEMV, prefill as 'triton-kpacked'
                    for mod in model.modules():
                        if hasattr(mod, "kernel"):
                            mod.kernel = "cuda-gemv"
                sync()
                setup_peak = mem("peak")
                mem_reset()
                r = llama.generate_timed(model, 1, prompt, new, use_graph=not CPU)
                kp_bytes = sum(m._kernel_cache["kpacked"][1].nbytes() for m in model.modules()
                               if getattr(m, "_kernel_cache", {}).get("kpacked"))
                res["e2e"].append(dict(variant=variant, **r, peak_bytes=mem("peak"),
                                       setup_peak_bytes=setup_peak, released_bytes=released, resident_bytes=mem("now"),
                                       weight_bytes=llama.weight_bytes(model), kv_bytes=llama.kv_bytes(model),
                                       kpacked_bytes=kp_bytes))
            except Exception as e:  # noqa: BLE001
                res["e2e"].append(dict(variant=variant, error=f"{type(e).__name__}: {e}"[-300:]))
            model = None
            log(f"e2e {variant}: {res['e2e'][-1].get('tokens_per_s', res['e2e'][-1].get('error'))}")
            save()

    for name in args.sections.split(","):  # in the order asked: the first ones are safe from the budget
        dict(correctness=section_correctness, timings=section_timings, sweep=section_sweep, small_m=section_small_m,
             large_m=section_large_m, e2e=section_e2e)[name]()

    for t in res.get("timings", []):
        if "us" in t:
            print(f"{t['kernel']:20s} {t.get('scheme', ''):7s} {t['n']}x{t['k']}: {t['us']:7.1f} us"
                  + (f"  {t['vs_fp16']:.2f}x fp16" if "vs_fp16" in t else "") + f"  {t.get('gbps', 0):.0f} GB/s")
    best = {}
    for s in res.get("sweep", []):
        if "us" in s and (s["scheme"] not in best or s["us"] < best[s["scheme"]]["us"]):
            best[s["scheme"]] = s
    for key, s in best.items():
        print("best", key, s["config"], f"{s['us']:.1f} us")
    for e in res.get("e2e", []):
        print("e2e", e)


if __name__ == "__main__":
    main()
