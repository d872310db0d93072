"""Equivalent scalings: folding any positive per-channel scale leaves the float model unchanged."""
import pytest
import torch

from abqllm.methods import transforms as T
from abqllm.models.arch import arch_for, decoder_blocks
from tests.models.test_arch import CONFIGS, tiny_model


@torch.no_grad()
def _randomize(model):
    """Norm weights/biases and linear biases away from their init (ones/zeros), so folds are tested."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
@torch.no_grad()
def test_fold_random_scales_keeps_logits(architecture):
    model = tiny_model(architecture)
    _randomize(model)
    arch = arch_for(model.config)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    gen = torch.Generator().manual_seed(2)
    changed = 0
    for block in decoder_blocks(model, arch):
        scales = {}
        for g in arch.groups:
            if g.prev is None:
                continue
            n = block.get_submodule(g.prev).weight.shape[0]
            scales[g.prev] = torch.exp(torch.randn(n, generator=gen))  # 0.1 .. 10
        T.fold_scales(block, arch, scales)
        changed += len(scales)
    assert changed == 2 * sum(g.prev is not None for g in arch.groups) >= 6
    out = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4), (out - ref).abs().max()


def test_gemma_norm_fold_is_one_plus_weight():
    w, s = torch.tensor([0.5, -0.2, 0.0]), torch.tensor([2.0, 0.5, 4.0])
    new, _ = T.divide_norm(w, None, s, plus_one=True)
    torch.testing.assert_close(1 + new, (1 + w) / s)
    new, _ = T.divide_norm(w, None, s, plus_one=False)
    torch.testing.assert_close(new, w / s)


def test_layernorm_bias_and_linear_bias_divided():
    w, b, s = torch.randn(4), torch.randn(4), torch.rand(4) + 0.5
    nw, nb = T.divide_norm(w, b, s, plus_one=False)
    torch.testing.assert_close((nw, nb), (w / s, b / s))
    lw, lb = T.divide_rows(torch.randn(4, 3), b, s)
    torch.testing.assert_close(lb, b / s)


def test_kv_expand_and_reduce():
    # 2 kv heads of dim 3, 4 query heads: o_proj column h*3+d reads v channel (h//2)*3+d
    s = torch.arange(1.0, 7.0)
    cols = T.expand_kv(s, 12, head_dim=3)
    assert cols.tolist() == [1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]
    assert torch.equal(T.reduce_kv(cols, 6, 3, "max"), s)
    assert torch.equal(T.reduce_kv(cols, 6, 3, "mean"), s)
    assert T.expand_kv(s, 6, 3) is s and T.reduce_kv(s, 6, 3) is s
