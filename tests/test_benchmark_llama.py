"""The end-to-end decode model of the GPU benchmarks (benchmarks/gpu/llama.py): its fused layer path
(benchmarks/gpu/fused_ops.py) computes what the plain torch path computes. The kernels run in Triton's CPU
interpreter (a child pytest with TRITON_INTERPRET=1, as the kernel tests do)."""
import os
from pathlib import Path

import pytest
import torch

from tests.kernels import helpers

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETED:
    def test_in_interpreter():
        helpers.run_in_interpreter(str(Path(__file__)), "-k", "fused")


@pytest.mark.parametrize("scheme", [None, "W4A16g32", "W8A8"])
def test_fused_layers_match_the_torch_layers(scheme):
    if not INTERPRETED:
        pytest.skip("runs in the interpreter child (test_in_interpreter)")
    from abqllm.spec import parse_scheme
    from benchmarks.gpu import llama
    shape = llama.Shape(dim=64, n_layers=2, n_heads=4, ffn=96, vocab=50, max_seq=12)
    spec = parse_scheme(scheme).layer if scheme else None
    torch.manual_seed(0)
    plain = llama.Llama(shape, spec, 2, "cpu", fused=False)
    fused = llama.Llama(shape, spec, 2, "cpu", fused=True)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for blk in plain.blocks:  # non-trivial norm weights
            blk.norm1.weight.uniform_(0.5, 1.5)
            blk.norm2.weight.uniform_(0.5, 1.5)
        fused.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, shape.vocab, (2, 5))
    outs = []
    for model in (plain, fused):  # a 5-token prefill, then two decode steps
        steps = [model(tokens, torch.arange(5))]
        nxt = steps[-1].argmax(-1, keepdim=True)
        for p in (5, 6):
            steps.append(model(nxt, torch.tensor([p])))
            nxt = steps[-1].argmax(-1, keepdim=True)
        outs.append(torch.stack(steps))
        assert torch.isfinite(outs[-1]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-3)  # (bit-identical in the interpreter)
    torch.testing.assert_close(fused.blocks[1].k_cache, plain.blocks[1].k_cache, rtol=1e-3, atol=1e-3)
