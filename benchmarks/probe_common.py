"""What the per-block probes (block_errors.py, token_errors.py) share: the default model's float block inputs
from 16 x 256 calibration tokens, and one block quantized by a method on the float stream."""
import copy

import torch

import abqllm
from abqllm.calib.runner import BlockContext, capture_block_inputs
from abqllm.data.sources import calibration_samples, load_text
from abqllm.methods import get_method
from abqllm.models.arch import arch_for, block_linears, decoder_blocks
from abqllm.spec import parse_scheme


class Probe:
    def __init__(self, scheme: str):
        model, tok = abqllm.load_model("smollm2-135m", attn_implementation="eager")
        self.arch = arch_for(model.config)
        self.x, self.kw = capture_block_inputs(model, self.arch, calibration_samples(tok, load_text(None), 16, 256, seed=0))
        self.blocks = decoder_blocks(model, self.arch)
        self.spec = parse_scheme(scheme)

    def context(self, i: int, block, name: str = "", linears: dict | None = None) -> BlockContext:
        return BlockContext(i, len(self.blocks), name, block, linears or {}, self.arch, self.spec, torch.device("cpu"),
                            self.x, self.x, self.kw[i], 8)

    def quantized(self, i: int, method: str, opts: dict):
        """(block i quantized by `method` on the current float input, its context)."""
        b = copy.deepcopy(self.blocks[i])
        ctx = self.context(i, b, f"model.layers.{i}", dict(block_linears(b, self.arch)))
        meth = get_method(method, **opts)
        torch.manual_seed(0)
        res = meth.calibrate(ctx)
        for n, q in meth.apply(ctx, res).items():
            b.set_submodule(n, q)
        return b, ctx

    def advance(self, i: int) -> torch.Tensor:
        """The float stream past block i (the next block's input)."""
        self.x = self.context(i, self.blocks[i]).run(self.blocks[i], self.x)
        return self.x
