"""The GEMV decode kernel on a GPU: correctness, the M = 1 timings against the older qlinear_kernel path,
torch fp16 and GemLite (if carried), a tile sweep, and end-to-end decode at batch 1. One call, under 4 minutes.

    python benchmarks/gpu/gemv_check.py --out DIR
Writes DIR/gemv.json and prints a table. Made after the first GPU suite run put the old M = 1 path at
0.1-0.3 of the memory roofline (benchmarks/results/gpu_h100_2026-11-28_run1).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from abqllm.kernels import triton_linear as TL  # noqa: E402
from abqllm.kernels.reference import linear_reference  # noqa: E402
from abqllm.spec import parse_scheme  # noqa: E402
from benchmarks import gpu_suite as GS  # noqa: E402
from benchmarks.gpu import llama, peers  # noqa: E402

SCHEMES = ["W4A16", "W2A16", "W2A8", "W8A8", "W4A8", "W1A16", "W8A16"]
SHAPES = [(8192, 8192), (4096, 4096), (11008, 4096), (4096, 11008)]
SWEEP = [dict(bn=32, words=32), dict(bn=16, words=32), dict(bn=64, words=16), dict(bn=16, words=64),
         dict(bn=32, words=64, num_warps=8), dict(bn=64, words=32, num_warps=8), dict(bn=8, words=32, num_warps=2),
         dict(bn=32, words=16, num_warps=2), dict(bn=32, words=32, num_stages=3), dict(bn=32, words=32, split_k=1),
         dict(bn=32, words=32, split_k=2), dict(bn=32, words=32, split_k=8), dict(bn=16, words=16, num_warps=1)]
SWEEP_SHAPES = [(8192, 8192), (4096, 4096)]
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def layer(scheme, n, k, dev, seed=0, gs=128):
    qs = parse_scheme(scheme + (f"g{gs}" if gs else ""))
    return llama.random_quant_linear(k, n, qs.layer, dev, seed=seed)


def old_config(n, k, dev):
    """What default_config picked at M = 1 before the GEMV (run 1's kernel)."""
    return TL._with_split(TL._gpu_decode_config(1, 128), 1, n, k, 128, TL.DECODE_PROGRAMS_PER_SM * TL._num_sms(0))


def _warm(items):
    dev = torch.device("cuda")
    errs = []
    for scheme, n, k, cfg, gs in items:
        try:
            L = layer(scheme, n, k, dev, gs=gs)
            TL.qlinear(torch.randn(1, k, device=dev, dtype=torch.float16), **TL.layer_args(L), config=cfg)
        except Exception as e:  # noqa: BLE001
            errs.append(f"{scheme} {cfg}: {type(e).__name__}: {e}"[-300:])
    torch.cuda.synchronize()
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=200)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targs = argparse.Namespace(calls=20, replays=7)
    dev = torch.device("cuda")
    res = dict(gpu=torch.cuda.get_device_name(0), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), torch=torch.__version__)
    save = lambda: (out / "gemv.json").write_text(json.dumps(res, indent=1, default=str))  # noqa: E731

    # compile everything in parallel first
    items = [(s, n, k, TL.GemvConfig(), 128) for s in SCHEMES for (n, k) in SHAPES]
    items += [(s, 200, k, TL.GemvConfig(), gs) for s in SCHEMES for gs, k in ((0, 576), (64, 1000))]
    items += [(s, n, k, TL.GemvConfig(**c), 128) for s in SCHEMES[:5] for (n, k) in SWEEP_SHAPES for c in SWEEP]
    items += [(s, n, k, old_config(n, k, dev), 128) for s in SCHEMES for (n, k) in SHAPES[:1]]
    chunks = [items[i::14] for i in range(14)]
    with mp.get_context("spawn").Pool(14) as pool:
        try:
            res["warm_errors"] = [e for es in pool.map_async(_warm, chunks).get(timeout=90) for e in es]
        except mp.TimeoutError:
            res["warm_errors"] = ["warm-up timed out"]
    log(f"warm-up: {len(items)} launches, errors: {res['warm_errors'][:3]}")

    # correctness on GPU vs the float64 reference
    rows = []
    for scheme in SCHEMES:
        for gs, k in ((128, 4096), (0, 576), (64, 1000)):
            qs = parse_scheme(scheme + (f"g{gs}" if gs else ""))
            L = llama.random_quant_linear(k, 200, qs.layer, "cpu", seed=k)
            x = (torch.randn(1, k) * 2 + 0.3).half()
            ref = linear_reference(L, x.double())
            Lg = GS._to(L, dev)
            o = torch.full((1, 200), float("nan"), dtype=torch.float16, device=dev)
            try:
                y = TL.qlinear(x.to(dev), **TL.layer_args(Lg), out=o)
                rows.append(dict(scheme=scheme, gs=gs, k=k, **GS._check(y, ref, torch.float16)))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(scheme=scheme, gs=gs, k=k, ok=False, error=f"{type(e).__name__}: {e}"[-300:]))
    res["correctness"] = rows
    log(f"correctness: {sum(r['ok'] for r in rows)}/{len(rows)}; failures: {[r for r in rows if not r['ok']][:3]}")
    save()

    def timed(fns):
        return GS.time_fn(fns, targs, True)["s"] * 1e6

    # M = 1 timings: fp16, old path, GEMV default, GemLite
    res["timings"] = []
    for (n, k) in SHAPES:
        c = GS.copies_needed(n * k * 2, True)
        ws = [torch.randn(n, k, device=dev, dtype=torch.float16) for _ in range(c)]
        xs = [torch.randn(1, k, device=dev, dtype=torch.float16) for _ in range(c)]
        fp16 = timed([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)])
        del ws
        res["timings"].append(dict(kernel="torch fp16", n=n, k=k, us=fp16))
        for scheme in SCHEMES:
            qs = parse_scheme(scheme + "g128")
            c = GS.copies_needed(n * k * qs.weight.storage_bits // 8, True)
            Ls = [layer(scheme, n, k, dev, seed=i) for i in range(c)]
            xs = [torch.randn(1, k, device=dev, dtype=torch.float16) for _ in range(c)]
            kinds = [("gemv", None)] + ([("old qlinear_kernel", old_config(n, k, dev))] if (n, k) == SHAPES[0] else [])
            for name, cfg in kinds:
                try:
                    us = timed([lambda L=L, x=x: TL.qlinear(x, **TL.layer_args(L), config=cfg) for L, x in zip(Ls, xs)])
                    res["timings"].append(dict(kernel=name, scheme=scheme, n=n, k=k, us=us, vs_fp16=fp16 / us,
                                               gbps=(n * k * qs.weight.storage_bits / 8 + n * (k // 128) * 3) / us / 1e3))
                except Exception as e:  # noqa: BLE001
                    res["timings"].append(dict(kernel=name, scheme=scheme, n=n, k=k, error=str(e)[-300:]))
            bits, a = qs.weight.bits, qs.act.bits
            pr = peers.time_peer(scheme, bits, False, a, 128, 1, n, k, c, dev, lambda f: GS.time_fn(f, targs, True))
            if pr and "s" in pr:
                res["timings"].append(dict(kernel=pr["kernel"], scheme=scheme, n=n, k=k, us=pr["s"] * 1e6,
                                           vs_fp16=fp16 / (pr["s"] * 1e6)))
            del Ls
        log(f"timings {n}x{k} done")
        save()

    # tile sweep
    res["sweep"] = []
    for (n, k) in SWEEP_SHAPES:
        for scheme in SCHEMES[:5]:
            qs = parse_scheme(scheme + "g128")
            c = GS.copies_needed(n * k * qs.weight.storage_bits // 8, True)
            Ls = [layer(scheme, n, k, dev, seed=i) for i in range(c)]
            xs = [torch.randn(1, k, device=dev, dtype=torch.float16) for _ in range(c)]
            for cd in SWEEP:
                if time.time() - T0 > args.budget_s - 70:
                    break
                cfg = TL.GemvConfig(**cd)
                try:
                    us = timed([lambda L=L, x=x: TL.qlinear(x, **TL.layer_args(L), config=cfg) for L, x in zip(Ls, xs)])
                    res["sweep"].append(dict(scheme=scheme, n=n, k=k, config=asdict(cfg), us=us))
                except Exception as e:  # noqa: BLE001
                    res["sweep"].append(dict(scheme=scheme, n=n, k=k, config=asdict(cfg), error=str(e)[-200:]))
            del Ls
    log("sweep done")
    save()

    # end to end, batch 1, current defaults
    res["e2e"] = []
    shape = llama.Shape(max_seq=128 + 256)
    for variant in ["fp16", "W4A16", "W2A8", "W8A8", "W4A8"]:
        if time.time() - T0 > args.budget_s - 12:
            break
        spec = None if variant == "fp16" else parse_scheme(variant + "g128").layer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model = llama.Llama(shape, spec, 1, dev)
            r = llama.generate_timed(model, 1, 128, 256, use_graph=True)
            res["e2e"].append(dict(variant=variant, **r, peak_bytes=torch.cuda.max_memory_allocated(),
                                   weight_bytes=llama.weight_bytes(model), kv_bytes=llama.kv_bytes(model)))
        except Exception as e:  # noqa: BLE001
            res["e2e"].append(dict(variant=variant, error=f"{type(e).__name__}: {e}"[-300:]))
        model = None
        log(f"e2e {variant}: {res['e2e'][-1].get('tokens_per_s', res['e2e'][-1].get('error'))}")
    save()

    for t in res["timings"]:
        if "us" in t:
            print(f"{t['kernel']:22s} {t.get('scheme', ''):6s} {t['n']}x{t['k']}: {t['us']:7.1f} us"
                  + (f"  {t['vs_fp16']:.2f}x fp16" if "vs_fp16" in t else ""))
    best = {}
    for s in res["sweep"]:
        if "us" in s:
            key = (s["scheme"], s["n"], s["k"])
            if key not in best or s["us"] < best[key]["us"]:
                best[key] = s
    for key, s in best.items():
        print("best", key, s["config"], f"{s['us']:.1f} us")


if __name__ == "__main__":
    main()
