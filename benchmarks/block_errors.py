"""Per-block output error of methods on the default model, block by block on the float stream.

    python benchmarks/block_errors.py "W2*A16" 0,3 "[('rtn',{}),('abq',{'epochs':0})]"

Prints, for each listed block and method, the mean squared error of the quantized block output
against the float block (both fed the float stream). Not part of the test run.
"""
import ast
import sys
import time

from probe_common import Probe

scheme = sys.argv[1]; blocks = [int(b) for b in sys.argv[2].split(",")]; variants = ast.literal_eval(sys.argv[3])
p = Probe(scheme)
for i in range(max(blocks) + 1):
    if i in blocks:
        for name, opts in variants:
            t0 = time.time()
            b, ctx = p.quantized(i, name, opts)
            y = ctx.run(p.blocks[i], p.x); yq = ctx.run(b, p.x)
            err = (yq - y).pow(2).mean().item(); rel = err / (y - p.x).pow(2).mean().item()
            print(f"block {i} {name} {opts}: mse {err:.4g} rel-to-block-update {rel:.4f} ({time.time()-t0:.1f}s)", flush=True)
    p.advance(i)
