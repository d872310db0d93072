"""Where the calibration's growing RSS comes from: quantize the default model block by block (RTN, no
data) and print anonymous and file-backed resident memory (RssAnon / RssFile of /proc/self/status)
after each block, with the freed heap trimmed. Linux only; not part of the test run.

    OMP_NUM_THREADS=1 python benchmarks/rss_probe.py W4A8
"""
import ctypes
import gc
import sys

import torch

import abqllm
from abqllm.models.arch import arch_for, block_linears, decoder_blocks
from abqllm.nn.qlinear import QuantLinear
from abqllm.spec import parse_scheme


def rss_mb() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) // 1024
    return out


def main():
    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    model, _ = abqllm.load_model("smollm2-135m")
    print("loaded", rss_mb(), flush=True)
    spec = parse_scheme(sys.argv[1] if len(sys.argv) > 1 else "W4A8")
    arch = arch_for(model.config)
    for i, block in enumerate(decoder_blocks(model, arch)):
        for name, lin in block_linears(block, arch).items():
            block.set_submodule(name, QuantLinear.from_float(lin, spec.layer))
        gc.collect()
        libc.malloc_trim(0)
        if i % 5 == 0:
            print(f"after block {i}", rss_mb(), flush=True)


if __name__ == "__main__":
    main()
