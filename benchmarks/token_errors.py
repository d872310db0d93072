"""Where a block's quantization error lives: per token position, on the float stream.

    python benchmarks/token_errors.py W4A8 10,11 "[('rtn',{}),('abq',{'epochs':0})]"

For each listed block and method: the block output MSE against the float block (as block_errors.py),
the share of the squared error at position 0 of the windows and at the worst other position, and
the largest |value| of the float block's output at position 0 and elsewhere (massive activations).
Not part of the test run.
"""
import ast, copy, sys
import torch
import abqllm
from abqllm.calib.runner import BlockContext, capture_block_inputs
from abqllm.data.sources import load_text, calibration_samples
from abqllm.methods import get_method
from abqllm.models.arch import arch_for, block_linears, decoder_blocks
from abqllm.spec import parse_scheme
scheme = sys.argv[1]; blocks = [int(b) for b in sys.argv[2].split(",")]; variants = ast.literal_eval(sys.argv[3])
m, t = abqllm.load_model("smollm2-135m", attn_implementation="eager")
ids = calibration_samples(t, load_text(None), 16, 256, seed=0)
arch = arch_for(m.config)
x, kw = capture_block_inputs(m, arch, ids)
bl = decoder_blocks(m, arch)
spec = parse_scheme(scheme)
for i in range(max(blocks) + 1):
    ctx0 = BlockContext(i, 30, "", bl[i], {}, arch, spec, torch.device("cpu"), x, x, kw[i], 8)
    if i in blocks:
        y = ctx0.run(bl[i], x)
        print(f"block {i} float output max|y|: position 0 {y[:, 0].abs().max():.1f}, others {y[:, 1:].abs().max():.1f}")
        for name, opts in variants:
            b = copy.deepcopy(bl[i])
            ctx = BlockContext(i, 30, f"model.layers.{i}", b, dict(block_linears(b, arch)), arch, spec, torch.device("cpu"), x, x, kw[i], 8)
            meth = get_method(name, **opts)
            torch.manual_seed(0)
            res = meth.calibrate(ctx)
            for n, q in meth.apply(ctx, res).items(): b.set_submodule(n, q)
            e = (ctx.run(b, x) - y).pow(2).sum(-1)  # [windows, positions]
            pos = e.sum(0); tot = pos.sum()
            print(f"block {i} {name} {opts}: mse {tot / y.numel():.4g}, position 0 share {pos[0] / tot:.3f}, "
                  f"worst other position {int(pos[1:].argmax()) + 1} share {pos[1:].max() / tot:.3f}", flush=True)
    x = ctx0.run(bl[i], x)
