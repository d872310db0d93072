"""Peak memory of one stage of work: CUDA allocator peak on GPU, the process's resident-set peak on CPU.

On Linux the RSS high-water mark (VmHWM) can be reset by writing 5 to /proc/self/clear_refs, so the
peak of each block is measured on its own; elsewhere the CPU figure is the process peak so far
(monotonic) or None when even that is unavailable.
"""

from __future__ import annotations

import resource
import sys

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # not permitted: peak_mb falls back to the process peak


def peak_mb(device: torch.device) -> float | None:
    """Peak since reset_peak: CUDA allocated memory, or the process's resident set (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / (2**20 if sys.platform == "darwin" else 1024)
