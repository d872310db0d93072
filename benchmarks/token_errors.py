"""Where a block's quantization error lives: per token position, on the float stream.

    python benchmarks/token_errors.py W4A8 10,11 "[('rtn',{}),('abq',{'epochs':0})]"

For each listed block and method: the block output MSE against the float block (as block_errors.py),
the share of the squared error at position 0 of the windows and at the worst other position, and
the largest |value| of the float block's output at position 0 and elsewhere (massive activations).
Not part of the test run.
"""
import ast
import sys

from probe_common import Probe

scheme = sys.argv[1]; blocks = [int(b) for b in sys.argv[2].split(",")]; variants = ast.literal_eval(sys.argv[3])
p = Probe(scheme)
for i in range(max(blocks) + 1):
    if i in blocks:
        y = p.context(i, p.blocks[i]).run(p.blocks[i], p.x)
        print(f"block {i} float output max|y|: position 0 {y[:, 0].abs().max():.1f}, others {y[:, 1:].abs().max():.1f}")
        for name, opts in variants:
            b, ctx = p.quantized(i, name, opts)
            e = (ctx.run(b, p.x) - y).pow(2).sum(-1)  # [windows, positions]
            pos = e.sum(0); tot = pos.sum()
            print(f"block {i} {name} {opts}: mse {tot / y.numel():.4g}, position 0 share {pos[0] / tot:.3f}, "
                  f"worst other position {int(pos[1:].argmax()) + 1} share {pos[1:].max() / tot:.3f}", flush=True)
    p.advance(i)
