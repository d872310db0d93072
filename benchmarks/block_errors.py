"""Per-block output error of methods on the default model, block by block on the float stream.

    python benchmarks/block_errors.py "W2*A16" 0,3 "[('rtn',{}),('abq',{'epochs':0})]"

Prints, for each listed block and method, the mean squared error of the quantized block output
against the float block (both fed the float stream). Not part of the test run.
"""
import ast, copy, sys, time
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
    if i in blocks:
        for name, opts in variants:
            b = copy.deepcopy(bl[i])
            ctx = BlockContext(i, 30, f"model.layers.{i}", b, dict(block_linears(b, arch)), arch, spec, torch.device("cpu"), x, x, kw[i], 8)
            meth = get_method(name, **opts)
            torch.manual_seed(0); t0 = time.time()
            res = meth.calibrate(ctx)
            for n, q in meth.apply(ctx, res).items(): b.set_submodule(n, q)
            y = ctx.run(bl[i], x); yq = ctx.run(b, x)
            err = (yq - y).pow(2).mean().item(); rel = err / (y - x).pow(2).mean().item()
            print(f"block {i} {name} {opts}: mse {err:.4g} rel-to-block-update {rel:.4f} ({time.time()-t0:.1f}s)", flush=True)
    x = BlockContext(i, 30, "", bl[i], {}, arch, spec, torch.device("cpu"), x, x, kw[i], 8).run(bl[i], x)
