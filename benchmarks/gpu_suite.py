"""The GPU suite: check every kernel against the reference, time kernels and baselines, run end-to-end decode.

One run (benchmarks/gpu_suite.sh wraps it) on one GPU, sections in this order, each written to
$OUT/results.json as soon as it finishes so that a run cut short keeps what it measured:
  env         device, versions, date
  warmup      compiles every Triton kernel variant the timings need, in parallel worker processes that fill
              Triton's disk cache (sizes are not specialized, so one compile serves every shape)
  ceilings    memory bandwidth (device copy, bytes read + written) and tensor-core peaks (fp16/bf16
              matmul, torch._int_mm) measured in the same run: the rooflines every figure is set against
  sass        which MMA instructions the CUDA binary kernel really contains (cuobjdump)
  correctness every Triton WpAq x A and the CUDA bit-plane kernel vs the float64 reference on fresh random
              inputs, outputs poisoned with NaN first
  kernels     median times (CUDA events around CUDA-graph replays of 20 calls, rotating among weight copies
              that together exceed the L2 cache) for M x (N, K) x every WpAq x {A16, A8, A4}, the baselines
              (torch fp16/bf16 matmul, torch._int_mm, GemLite if installed) and the CUDA bit-plane path (M <= 64)
  e2e         Llama-2-7B-shaped decode with random weights: batch 1 and 16, prompt 128, 256 new tokens,
              each decode step one CUDA-graph replay; tokens/s and peak memory per variant
and $OUT/results.md with the tables (fraction of the roofline for each result) and the issue's targets.

  python benchmarks/gpu_suite.py --out DIR [--quick] [--skip e2e,...] [--layers 32]
  python benchmarks/gpu_suite.py --cpu --out DIR    # no GPU: tiny shapes through Triton's interpreter
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "warmup", "ceilings", "sass", "correctness", "kernels", "e2e")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "out" / "gpu_suite")))
    ap.add_argument("--cpu", action="store_true", help="no GPU: tiny shapes, Triton interpreter, no graphs")
    ap.add_argument("--quick", action="store_true", help="fewer widths, shapes and batch sizes (a smoke run)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    ap.add_argument("--only", default="", help="comma-separated sections to run (the others are skipped); results "
                    "merge into an existing results.json, so gpu_suite.sh runs each step in its own process and a "
                    "CUDA fault in one step cannot lose the others")
    ap.add_argument("--group-size", type=int, default=128, help="weight group size for timings (0 = per-channel)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers in the end-to-end model (7B: 32)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--warmup-timeout-s", type=float, default=150.0)
    ap.add_argument("--calls", type=int, default=20, help="kernel calls captured per CUDA graph")
    ap.add_argument("--replays", type=int, default=7, help="timed graph replays (median taken)")
    ap.add_argument("--kernel-budget-s", type=float, default=250.0,
                    help="kernel timings start no new shape after this many seconds since the start")
    ap.add_argument("--budget-s", type=float, default=390.0,
                    help="nothing new starts after this many seconds (keep it under the caller's timeout)")
    args = ap.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    only = {s for s in args.only.split(",") if s}
    unknown = (args.skip | only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {sorted(unknown)}")
    if only:
        args.skip |= set(SECTIONS) - only
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.cpu:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(ROOT))
from abqllm.kernels import cuda as CU  # noqa: E402
from abqllm.kernels import cuda_gemv as CG  # noqa: E402
from abqllm.kernels import dense_prefill as DP  # noqa: E402
from abqllm.kernels import kpacked_linear as KL  # noqa: E402
from abqllm.kernels import triton_linear as TL  # noqa: E402
from abqllm.kernels.reference import linear_reference  # noqa: E402
from abqllm.kernels.timing import copies_to_miss_l2, median_seconds  # noqa: E402
from abqllm.spec import ActSpec, LayerSpec, WeightSpec, parse_scheme  # noqa: E402
from benchmarks.gpu import llama, peers  # noqa: E402
from benchmarks.gpu.suite_plan import (PC_MS, PC_WEIGHTS, correctness_plan, e2e_plan,  # noqa: E402
                                       kernel_blocks, kernel_plan, sweep_plan, warmup_chunks, warmup_items)
from benchmarks.gpu.suite_report import _render_targets, render  # noqa: E402

T0 = time.time()


# ---- bookkeeping --------------------------------------------------------------------------------

class Results:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        path = out / "results.json"
        # merge: each step of gpu_suite.sh is its own process and adds its sections to the same file
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def put(self, section: str, value) -> None:
        self.data[section] = value
        self.save()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def over_budget(args, budget: float | None = None) -> bool:
    return time.time() - T0 > (args.budget_s if budget is None else budget)


# ---- timing -------------------------------------------------------------------------------------

def time_fn(fns: list, args, cuda: bool, calls: int | None = None) -> dict:
    """Median seconds per call (abqllm/kernels/timing.py: CUDA-graph replays between CUDA events, rotating among
    `fns`, closures over different buffers, so that weights are not L2-hot)."""
    return median_seconds(fns, cuda, calls=calls or args.calls, replays=args.replays)


def copies_needed(bytes_one: int, cuda: bool) -> int:
    return copies_to_miss_l2(bytes_one, torch.device("cuda" if cuda else "cpu"))


# ---- sections -----------------------------------------------------------------------------------

def section_env(dev) -> dict:
    import triton
    env = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), python=platform.python_version(), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda, host=platform.node())
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1), capability=f"{p.major}.{p.minor}")
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                                                "clocks.max.mem,power.limit", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        env["gpu"] = "none (CPU, Triton interpreter)"
    return env


def _warm_worker(items: list, device: str = "cuda") -> list:
    """Run each launch once (in a fresh process): compiles it into Triton's disk cache. An item is
    (m, n, k, wname, bits, balanced, a, gs, dtype, what): what = 'timed' (our timed Triton kernels at this M, and the
    peer's), 'e2e' (what the end-to-end variants launch), 'checked' (every Triton launcher the correctness check
    runs), or a sweep label."""
    from benchmarks.gpu import suite_kernels as SK
    dev = torch.device(device)
    errors = []
    for (m, n, k, wname, bits, balanced, a, gs, dtype, what) in items:
        try:
            spec = LayerSpec(WeightSpec(bits, balanced=balanced, group_size=gs), ActSpec(a, symmetric=(m == 5)))
            layer = llama.random_quant_linear(k, n, spec, dev)
            x = torch.randn(m, k, device=dev, dtype=dtype)
            if what == "checked":
                for c in SK.CHECKED:
                    if not c.name.startswith("cuda") and c.serves(layer, x):
                        c.run(layer, x, torch.empty(m, n, device=dev, dtype=dtype))
            elif what == "e2e":  # auto's path, and the k-packed layout's (the /kpacked and /cuda variants)
                TL.linear_triton(layer, x)
                (KL.kp_gemv if m <= KL.KP_MAX_M else KL.kp_gemm)(x, **KL.layer_kp_args(layer))
            elif what == "timed":
                for t in SK.timed_for(m, a, layer, dev):
                    if not t.name.startswith("cuda"):  # (the CUDA kernels are built once, by nvcc, in the parent)
                        t.run(layer, x)
                if peers.available():
                    peers.time_peer(f"{wname}A{a}", bits, balanced, a, gs, m, n, k, 1, dev,
                                    lambda fns: (fns[0](), dict(s=0.0, mode="warm-up"))[1])  # one call: compiles
            else:
                for scheme, label, run in sweep_plan(argparse.Namespace(quick=False)):
                    if label == what and not label.startswith("cuda"):
                        run(layer, x)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{wname}A{a} M={m} N={n} K={k} {what}: {type(e).__name__}: {e}"[-300:])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return errors


def _build_cuda(dev) -> dict:
    """nvcc-build both CUDA libraries (bit planes, GEMV) at once, in threads, while the Triton workers compile."""
    import threading
    if CU.find_nvcc() is None:
        return dict(skipped="no nvcc")
    arch, done = CU._arch(dev), {}

    def one(name, source):
        t = time.time()
        try:
            CU.build(arch, source=source)
            done[name] = round(time.time() - t, 1)
        except Exception as e:  # noqa: BLE001
            done[name] = f"{type(e).__name__}: {e}"[-300:]
    threads = [threading.Thread(target=one, args=a) for a in (("bmma", CU.SOURCE), ("gemv", CG.SOURCE))]
    for th in threads:
        th.start()
    return dict(threads=threads, seconds=done)


def section_warmup(dev, args) -> dict:
    cuda = dev.type == "cuda"
    items = warmup_items(args, cuda)
    if not cuda:  # the dry run: the worker's code in this process, on the tiny plan (its compiles mean nothing)
        t = time.time()
        errors = _warm_worker(items, device="cpu")
        log(f"warmup (CPU, in process): {len(items)} launches in {time.time() - t:.0f}s, errors: {errors}")
        return dict(items=len(items), workers=0, seconds=round(time.time() - t, 1), errors=errors)
    import multiprocessing as mp
    cuda_build = _build_cuda(dev)
    chunks = warmup_chunks(items, min(12, (os.cpu_count() or 4) - 2), args, cuda)
    t = time.time()
    with mp.get_context("spawn").Pool(len(chunks)) as pool:
        # a worker killed by a CUDA fault would make a plain map wait forever: bound it
        pending = pool.map_async(_warm_worker, chunks)
        try:
            errors = [e for errs in pending.get(timeout=args.warmup_timeout_s) for e in errs]
        except mp.TimeoutError:
            errors = [f"warm-up not finished after {args.warmup_timeout_s:.0f}s; the rest compiles on first use"]
            pool.terminate()
    triton_s = time.time() - t
    for th in cuda_build.pop("threads", []):
        th.join()
    log(f"warmup: {len(items)} launches in {len(chunks)} processes, {triton_s:.0f}s, {len(errors)} errors; "
        f"nvcc builds: {cuda_build}")
    return dict(items=len(items), workers=len(chunks), seconds=round(time.time() - t, 1), errors=errors,
                cuda_build=cuda_build)


def section_ceilings(dev, args) -> dict:
    cuda = dev.type == "cuda"
    n_copy = (1 << 30) if cuda else (1 << 22)
    bufs = [torch.randn(n_copy // 2, device=dev, dtype=torch.float16) for _ in range(2)]
    t = time_fn([lambda: bufs[1].copy_(bufs[0])], args, cuda)["s"]
    out = dict(copy_bytes=2 * bufs[0].numel() * 2, bandwidth_Bps=2 * bufs[0].numel() * 2 / t)
    bufs.clear()
    n = 8192 if cuda else 256
    for dt in (torch.float16, torch.bfloat16):
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        t = time_fn([lambda: a @ b], args, cuda)["s"]
        out[f"{str(dt)[6:]}_flops"] = 2 * n ** 3 / t
    if cuda:
        a8 = torch.randint(-128, 127, (n, n), device=dev, dtype=torch.int8)
        b8 = torch.randint(-128, 127, (n, n), device=dev, dtype=torch.int8)
        t = time_fn([lambda: torch._int_mm(a8, b8.t())], args, cuda)["s"]
        out["int8_ops"] = 2 * n ** 3 / t
    else:
        out["int8_ops"] = out["float16_flops"]
    return out


def section_sass(dev) -> dict:
    if dev.type != "cuda" or CU.find_nvcc() is None:
        return dict(skipped="no CUDA device or no nvcc")
    arch = CU._arch(dev)
    lib = CU.build(arch)
    tool = Path(CU.find_nvcc()).with_name("cuobjdump")
    try:
        sass = subprocess.run([str(tool), "-sass", str(lib)], capture_output=True, text=True, timeout=120).stdout
    except OSError as e:
        return dict(library=str(lib), error=str(e))
    ops = {}
    for line in sass.splitlines():
        parts = line.split("*/")
        if len(parts) > 1 and parts[0].strip().startswith("/*"):
            op = parts[1].strip().split(" ")[0].rstrip(";")
            if any(k in op for k in ("MMA", "POPC")):
                ops[op] = ops.get(op, 0) + 1
    return dict(library=str(lib), arch=arch, mma_ops=ops)


def _check(y: torch.Tensor, ref: torch.Tensor, dtype, slack: torch.Tensor | float = 0.0) -> dict:
    """The kernel tolerance; `slack` widens it (e.g. by the rounding of weights to the activation dtype)."""
    rtol, atol = {torch.float16: (2.0 ** -10, 1e-4), torch.bfloat16: (2.0 ** -7, 1e-3)}[dtype]
    y = y.cpu().double()
    finite = bool(torch.isfinite(y).all())
    err = (y - ref).abs()
    bound = rtol * ref.abs() + atol * ref.abs().max() + slack
    ratio = float((err / bound).max()) if finite else float("inf")
    return dict(ok=finite and ratio <= 1.0, worst_ratio=round(ratio, 4),
                rel_err=float((y - ref).norm() / ref.norm()) if finite else None)


def section_correctness(dev, args) -> dict:
    """Every launcher of ours (suite_kernels.CHECKED) on random packed layers against the float64 CPU reference,
    outputs poisoned with NaN first; the split-K workspace must be zero again afterwards."""
    from benchmarks.gpu import suite_kernels as SK
    cuda = dev.type == "cuda"
    rows = []
    for (m, n, k, wname, bits, balanced, a, gs, dtype) in correctness_plan(args, cuda):
        spec = LayerSpec(WeightSpec(bits, balanced=balanced, group_size=gs), ActSpec(a, symmetric=(m == 5)))
        layer = llama.random_quant_linear(k, n, spec, "cpu", seed=m * 31 + a)
        layer.bias = torch.randn(n, generator=torch.Generator().manual_seed(k)).half()
        x = (torch.randn(m, k) * 2 + 0.3).to(dtype)
        x64 = x.double()
        ref = linear_reference(layer, x64)
        slack = None
        lg, xg = _to(layer, dev), x.to(dev)
        for c in SK.CHECKED:
            if not c.serves(lg, xg):
                continue
            if c.rounds_weights and slack is None:
                slack = SK.rounding_slack(layer, x64, dtype)
            try:
                out = torch.full((m, n), float("nan"), dtype=dtype, device=dev)
                y = c.run(lg, xg, out)
                res = _check(y, ref, dtype, slack if c.rounds_weights else 0.0)
            except Exception as e:  # noqa: BLE001  (record and go on)
                res = dict(ok=False, error=f"{type(e).__name__}: {e}"[-300:])
            rows.append(dict(kernel=c.name, scheme=f"{wname}A{a}", m=m, n=n, k=k, gs=gs, dtype=str(dtype)[6:], **res))
        CU._PLANES.clear()
    ws = KL._WORKSPACE.get(dev) or KL._WORKSPACE.get(torch.device("cuda", 0))
    workspace_zero = None if ws is None else bool(not ws[0].any() and not ws[1].any())
    bad = [r for r in rows if not r["ok"]]
    if workspace_zero is False:
        bad.append(dict(kernel="split-K workspace", ok=False, error="not left zero"))
    per_kernel = {}
    for r in rows:
        per_kernel.setdefault(r["kernel"], [0, 0])[0 if r["ok"] else 1] += 1
    log(f"correctness: {len(rows) - len(bad)}/{len(rows)} passed; per kernel (passed, failed): {per_kernel}; "
        f"workspace zero afterwards: {workspace_zero}")
    for r in bad[:20]:
        log(f"  FAILED {r}")
    return dict(passed=len(rows) - len(bad), total=len(rows), failures=bad, rows=rows, per_kernel=per_kernel,
                workspace_zero=workspace_zero)


def _to(layer, dev):
    import copy
    return copy.deepcopy(layer).to(dev)


def roofline(bytes_: float, ops: float, t: float, ceil: dict, int_path: bool) -> dict:
    peak = ceil["int8_ops"] if int_path else ceil["float16_flops"]
    t_mem, t_math = bytes_ / ceil["bandwidth_Bps"], ops / peak
    bound = "memory" if t_mem >= t_math else "compute"
    return dict(bound=bound, roofline_fraction=round(max(t_mem, t_math) / t, 4),
                tflops=round(ops / t / 1e12, 3), gbps=round(bytes_ / t / 1e9, 1))


def section_kernels(dev, args, ceil: dict, res: Results) -> dict:
    from benchmarks.gpu import suite_kernels as SK
    cuda = dev.type == "cuda"
    shapes, ms, weights, acts, gs = kernel_plan(args, cuda)
    rows, sweep, blocks = [], [], []
    peer = peers.available()
    log(f"kernels: {len(shapes)} shapes x {len(ms)} M x {len(weights)} weights x {len(acts)} acts; ours: "
        f"{', '.join(SK.OURS)}; peers: {peer}")

    def timed(fns, m):
        # few calls per graph for the long prefill launches: the replays stay short, the median as good
        calls = args.calls if m <= 64 else max(4, args.calls // 4)
        return time_fn(fns, args, cuda, calls=calls)

    for (n, k, m) in kernel_blocks(shapes, ms):
        if over_budget(args, min(args.kernel_budget_s, args.budget_s)):
            log("kernels: time budget reached, stopping (raise --kernel-budget-s or use --quick)")
            return dict(rows=rows, sweep=sweep, blocks=blocks, truncated=True)
        t_block, spent = time.time(), {}
        flops = 2.0 * m * n * k
        # ---- baselines
        base = {}
        for dt in (torch.float16, torch.bfloat16):
            nbytes = n * k * 2
            c = copies_needed(nbytes, cuda)
            ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(c)]
            xs = [torch.randn(m, k, device=dev, dtype=dt) for _ in range(c)]
            t = timed([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)], m)
            name = f"torch {str(dt)[6:]}"
            base[name] = t["s"]
            rows.append(dict(kernel=name, scheme="W16A16", m=m, n=n, k=k, us=t["s"] * 1e6, mode=t["mode"],
                             **roofline(nbytes + 2 * (m * k + m * n), flops, t["s"], ceil, False)))
            del ws, xs
        if cuda:
            mp_ = max(m, 17)  # torch._int_mm needs M > 16: smaller M is padded (and says so)
            c = copies_needed(n * k, cuda)
            ws = [torch.randint(-128, 127, (n, k), device=dev, dtype=torch.int8) for _ in range(c)]
            xs = [torch.randint(-128, 127, (mp_, k), device=dev, dtype=torch.int8) for _ in range(c)]
            try:
                t = timed([lambda w=w, x=x: torch._int_mm(x, w.t()) for w, x in zip(ws, xs)], m)
                base["torch _int_mm"] = t["s"]
                rows.append(dict(kernel="torch _int_mm", scheme="W8A8 (int8 GEMM only)", m=m, n=n, k=k,
                                 us=t["s"] * 1e6, mode=t["mode"] + ("" if mp_ == m else f", M padded to {mp_}"),
                                 **roofline(n * k + mp_ * k + 4 * mp_ * n, 2.0 * mp_ * n * k, t["s"], ceil, True)))
            except RuntimeError as e:
                rows.append(dict(kernel="torch _int_mm", m=m, n=n, k=k, error=str(e)[:200]))
            del ws, xs
        fp16 = base["torch float16"]
        spent["baselines"] = time.time() - t_block
        # ---- ours (+ peers) for every scheme; one set of weights per width serves A16, A8 and A4. Where the
        # grid's group size is not per channel, W8A8 and W4A8 also run per channel (scheme 'W8A8 pc') at PC_MS
        jobs = [(wname, bits, balanced, gs, acts, "") for wname, bits, balanced in weights]
        if gs and m in PC_MS:
            jobs += [(w, int(w[1]), False, 0, (8,), " pc") for w in PC_WEIGHTS]
        for wname, bits, balanced, gs_, acts_, suffix in jobs:
            t0 = time.time()
            sbits = bits + 1 if balanced else bits
            groups = 1 if gs_ == 0 else -(-k // gs_)
            wbytes = n * (-(-k // 32)) * 4 * sbits + n * groups * 3
            c = copies_needed(wbytes, cuda)
            wspec = WeightSpec(bits, balanced=balanced, group_size=gs_)
            base_layers = [llama.random_quant_linear(k, n, LayerSpec(wspec), dev, seed=i) for i in range(c)]
            xs = [torch.randn(m, k, device=dev, dtype=torch.float16) for _ in range(c)]
            nbytes = wbytes + 2 * (m * k + m * n)
            spent["layers"] = spent.get("layers", 0.0) + time.time() - t0
            for a in acts_:
                layers = [llama.with_act(L, ActSpec(a)) for L in base_layers]
                scheme = f"{wname}A{a}{suffix}"
                for kern in SK.timed_for(m, a, layers[0], dev):
                    t0 = time.time()
                    try:
                        if kern.prepare:
                            for L in layers:
                                kern.prepare(L)
                        t = timed([lambda L=L, x=x, f=kern.run: f(L, x) for L, x in zip(layers, xs)], m)
                        row = dict(kernel=kern.name, scheme=scheme, m=m, n=n, k=k, us=t["s"] * 1e6, mode=t["mode"],
                                   vs_fp16=round(fp16 / t["s"], 3), **roofline(nbytes, flops, t["s"], ceil, a != 16))
                        if kern.name == "triton":  # which path `auto` took
                            row["config"] = ("kp_gemv" if KL.use_gemv(xs[0]) else "dense" if DP.use_dense(xs[0])
                                             else str(TL.default_config(m, n, k, gs_, a != 16, dev)))
                        rows.append(row)
                    except Exception as e:  # noqa: BLE001  (record and go on)
                        rows.append(dict(kernel=kern.name, scheme=scheme, m=m, n=n, k=k,
                                         error=f"{type(e).__name__}: {e}"[-300:]))
                    spent[kern.name] = spent.get(kern.name, 0.0) + time.time() - t0
                if peer and cuda:
                    t0 = time.time()
                    pr = peers.time_peer(scheme, bits, balanced, a, gs_, m, n, k, c, dev, lambda fns: timed(fns, m))
                    if pr is not None:
                        pr.update(m=m, n=n, k=k, vs_fp16=round(fp16 / pr["s"], 3) if "s" in pr else None)
                        if "s" in pr:
                            pr.update(us=pr["s"] * 1e6, **roofline(nbytes, flops, pr["s"], ceil, a != 16))
                        rows.append(pr)
                    spent["peer"] = spent.get("peer", 0.0) + time.time() - t0
                if cuda and m == 1 and (n, k) == shapes[0] and not suffix:
                    sweep += _sweep_rows(args, scheme, layers, xs, timed, fp16)
            CU._PLANES.clear()
            del base_layers, layers, xs
        if cuda:
            torch.cuda.empty_cache()
        blocks.append(dict(n=n, k=k, m=m, seconds=round(time.time() - t_block, 1),
                           spent={a: round(b, 1) for a, b in spent.items()}))
        log(f"kernels: N={n} K={k} M={m} done in {time.time() - t_block:.1f}s ({len(rows)} rows; "
            f"{', '.join(f'{a} {b:.1f}s' for a, b in spent.items())})")
        res.put("kernels", dict(rows=rows, sweep=sweep, blocks=blocks, truncated=False, partial=True))
    return dict(rows=rows, sweep=sweep, blocks=blocks, truncated=False)


def _sweep_rows(args, scheme: str, layers, xs, timed, fp16: float) -> list[dict]:
    out = []
    for s_, label, run in sweep_plan(args):
        if s_ != scheme:
            continue
        try:
            t = timed([lambda L=L, x=x, f=run: f(L, x) for L, x in zip(layers, xs)], 1)
            out.append(dict(scheme=scheme, m=1, n=layers[0].out_features, k=layers[0].in_features, config=label,
                            us=t["s"] * 1e6, vs_fp16=round(fp16 / t["s"], 3), mode=t["mode"]))
        except Exception as e:  # noqa: BLE001
            out.append(dict(scheme=scheme, m=1, config=label, error=f"{type(e).__name__}: {e}"[-300:]))
    return out


def section_e2e(dev, args) -> dict:
    cuda = dev.type == "cuda"
    if cuda:
        shape = llama.Shape(n_layers=args.layers, max_seq=args.prompt + args.new_tokens)
        new_tokens, prompt = args.new_tokens, args.prompt
    else:
        shape = llama.Shape(dim=64, n_layers=1, n_heads=2, ffn=64, vocab=100, max_seq=8)
        new_tokens, prompt = 2, 3
    rows = []
    for b, variant in e2e_plan(args, cuda):
        if over_budget(args) and rows:
            log("e2e: time budget reached, stopping")
            return dict(rows=_vs_fp16(rows), truncated=True, shape=shape.__dict__)
        scheme, _, mode = variant.partition("/")
        gs = args.group_size if cuda else 32
        spec = None if scheme == "fp16" else parse_scheme(scheme + (f"g{gs}" if gs else "")).layer
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            model = llama.Llama(shape, spec, b, dev)
            released = KL.keep_only_kpacked(model) if mode else 0
            if mode == "cuda":
                for mod in model.modules():
                    if hasattr(mod, "kernel"):
                        mod.kernel = "cuda-gemv" if cuda else "triton-kpacked"
            wb, kvb = llama.weight_bytes(model), llama.kv_bytes(model)
            setup_peak = torch.cuda.max_memory_allocated(dev) if cuda else None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            r = llama.generate_timed(model, b, prompt, new_tokens, use_graph=cuda)
            peak = torch.cuda.max_memory_allocated(dev) if cuda else None
            row = dict(variant=variant, batch=b, layers=shape.n_layers, prompt=prompt, new_tokens=new_tokens, **r,
                       weight_bytes=wb, kv_bytes=kvb, peak_bytes=peak, setup_peak_bytes=setup_peak,
                       released_bytes=released, memory_over_weights_kv=round(peak / (wb + kvb), 3) if peak else None,
                       weight_read_roofline_tokens_per_s=round(b * _bw(args) / (wb + kvb), 1) if cuda else None)
        except Exception as e:  # noqa: BLE001
            row = dict(variant=variant, batch=b, error=f"{type(e).__name__}: {e}"[-400:],
                       trace=traceback.format_exc()[-1500:])
        rows.append(row)
        log(f"e2e: {variant} batch {b}: " + (f"{row['tokens_per_s']:.1f} tok/s, peak/(weights+KV) "
                                             f"{row['memory_over_weights_kv']}" if "tokens_per_s" in row
                                             else row.get("error", "")))
        model = None
    return dict(rows=_vs_fp16(rows), truncated=False, shape=shape.__dict__)


def _vs_fp16(rows: list[dict]) -> list[dict]:
    fp16 = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "fp16" and "tokens_per_s" in r}
    for r in rows:
        if "tokens_per_s" in r and r["batch"] in fp16:
            r["vs_fp16"] = round(r["tokens_per_s"] / fp16[r["batch"]], 3)
    return rows


_BW = {}


def _bw(args):
    return _BW.get("bw", 3.0e12)


# ---- main ---------------------------------------------------------------------------------------

def main(args) -> int:
    dev = torch.device("cuda" if (torch.cuda.is_available() and not args.cpu) else "cpu")
    if dev.type == "cpu" and not args.cpu:
        log("no CUDA device: use --cpu for the interpreter smoke run")
        return 2
    res = Results(Path(args.out))
    ran = [x for x in SECTIONS if x not in args.skip]
    res.data.setdefault("steps", []).append({"sections": ran, **{k: (sorted(v) if isinstance(v, set) else v)
                                                                 for k, v in vars(args).items()}})
    res.save()
    status = 0
    ceil = res.data.get("ceilings") if isinstance(res.data.get("ceilings"), dict) else None
    if ceil and "bandwidth_Bps" in ceil:  # measured by an earlier step of the same run
        _BW["bw"] = ceil["bandwidth_Bps"]
    else:
        ceil = None
    for section in SECTIONS:
        if section in args.skip:
            continue
        log(f"== {section}")
        try:
            if section == "env":
                res.put("env", section_env(dev))
            elif section == "warmup":
                res.put("warmup", section_warmup(dev, args))
            elif section == "ceilings":
                ceil = section_ceilings(dev, args)
                _BW["bw"] = ceil["bandwidth_Bps"]
                res.put("ceilings", ceil)
            elif section == "sass":
                res.put("sass", section_sass(dev))
            elif section == "correctness":
                r = section_correctness(dev, args)
                res.put("correctness", r)
                status |= r["passed"] != r["total"]
            elif section == "kernels":
                ceil = ceil or dict(bandwidth_Bps=3.0e12, float16_flops=7.5e14, int8_ops=1.5e15, assumed=True)
                res.put("kernels", section_kernels(dev, args, ceil, res))
            elif section == "e2e":
                res.put("e2e", section_e2e(dev, args))
        except Exception as e:  # noqa: BLE001  (one broken section must not lose the others)
            log(f"{section} FAILED: {type(e).__name__}: {e}")
            res.put(section, dict(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:]))
            status = 1
        (res.out / "results.md").write_text(render(res.data))
    log(f"wrote {res.out / 'results.json'} and {res.out / 'results.md'}")
    if not args.only:  # gpu_suite.sh prints the summary once, after its last step
        print(render({k: v for k, v in res.data.items() if k in ("env", "ceilings", "correctness")}))
        kr = res.data.get("kernels", {})
        if isinstance(kr, dict) and kr.get("rows"):
            print("\n".join(_render_targets(kr["rows"])))
    return status


if __name__ == "__main__":
    sys.exit(main(ARGS))
