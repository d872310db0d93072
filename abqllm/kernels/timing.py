"""Kernel timing as the GPU suite and kernel autotuning do it: median seconds per call after warm-up.

On a GPU: `calls` calls captured in one CUDA graph (so launch overhead does not hide the kernel), replayed `replays`
times between CUDA events; the calls rotate among closures over different buffers, so that weights are read from
memory, not from the L2 cache. If the capture fails (a kernel that is not graph-safe), the same loop runs eagerly and
the result says so. On the CPU: wall-clock medians.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch


def median_seconds(fns: list[Callable], cuda: bool, calls: int = 20, replays: int = 7) -> dict:
    """{'s': median seconds per call, 'mode': 'graph' | 'eager (...)' | 'cpu', 'spread': (max - min) / min}."""
    if not cuda:
        for f in fns:
            f()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fns[len(ts) % len(fns)]()
            ts.append(time.perf_counter() - t)
        return dict(s=sorted(ts)[len(ts) // 2], mode="cpu")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm-up: compiles, allocates workspaces, fills caches
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)]()
        run = graph.replay
        run()
    except Exception as e:  # noqa: BLE001  (report, then time eagerly)
        mode = f"eager ({type(e).__name__})"
        torch.cuda.synchronize()

        def run():
            for i in range(calls):
                fns[i % len(fns)]()
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    times.sort()
    return dict(s=times[len(times) // 2], spread=(times[-1] - times[0]) / max(times[0], 1e-12), mode=mode)


def copies_to_miss_l2(bytes_one: int, device: torch.device, factor: float = 3.0, cap: int = 16) -> int:
    """How many copies of a `bytes_one` operand to rotate among so that together they exceed `factor` x the L2."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(cap, math.ceil(factor * l2 / max(bytes_one, 1))))
