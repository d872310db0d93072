"""Rotating the residual stream by a random orthogonal matrix (QuaRot/SpinQuant's R1), before calibration
(`--rotate`, QuantSpec.rotate; any method).

For a pre-norm RMSNorm model, with every norm's weight folded into the linears that read it, the
residual stream can be multiplied by any orthogonal Q without changing the model's function:
embeddings E -> E Q; linears that read the stream (q/k/v, gate/up, lm_head) W -> W Q; linears
that write it (o_proj, down_proj) W -> Q^T W. RMSNorm with unit weight commutes with Q. The
rotation spreads outlier channels over all channels, which is what makes 4-bit activations and
2-3-bit weights workable (ABQ.md section 6: the paper's recipe alone is weak at W4A4).

Rotating each head's values as well (QuaRot's R2: v_proj's rows and o_proj's columns by a head_dim
Hadamard, offline) was tried and taken out: on the default model it made RTN worse, W4A4+rot+had:512
227.8 -> 310.9 and W4A16+rot 71.0 -> 79.6 (benchmarks/results/abq_dev_runs.md).

Only for architectures whose blocks write the residual stream straight from o_proj/down_proj
(no Gemma "sandwich" norms) and use RMSNorm; anything else gets a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from abqllm.errors import AbqError
from abqllm.models.arch import ArchSpec, arch_for, decoder_blocks


def random_orthogonal(d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Haar-random orthogonal d x d matrix (QR of a Gaussian, signs fixed), reproducible from the seed."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def check_rotatable(arch: ArchSpec) -> None:
    if arch.post_norms or arch.norm != "rmsnorm" or not arch.pre_norm:
        raise AbqError(f"residual rotation is implemented for pre-norm RMSNorm models without post-norms; "
                       f"{arch.name} is not one: drop --rotate")


def _fold_norm(norm: nn.Module, linears: list[nn.Linear], plus_one: bool) -> None:
    w = norm.weight.data.double()
    scale = (1 + w) if plus_one else w
    for lin in linears:
        lin.weight.data = (lin.weight.data.double() * scale).to(lin.weight.dtype)
    norm.weight.data.fill_(0.0 if plus_one else 1.0)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> None:
    """Fold norms and rotate the residual stream in place; the model computes the same function."""
    arch = arch_for(model.config)
    check_rotatable(arch)
    embed = model.get_submodule(arch.embed)
    lm_head = model.get_submodule(arch.lm_head)
    if lm_head.weight is embed.weight:  # untie: the two now get different transforms
        lm_head.weight = nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
    q = random_orthogonal(embed.weight.shape[1], seed)
    dt = embed.weight.dtype

    def reads(lin):  # W x with x on the rotated stream: W -> W Q
        lin.weight.data = (lin.weight.data.double() @ q).to(dt)

    def writes(lin):  # output onto the stream: W -> Q^T W (and its bias)
        lin.weight.data = (q.T @ lin.weight.data.double()).to(dt)
        if lin.bias is not None:
            lin.bias.data = (q.T @ lin.bias.data.double()).to(dt)

    embed.weight.data = (embed.weight.data.double() @ q).to(dt)
    for block in decoder_blocks(model, arch):
        sub = block.get_submodule
        _fold_norm(sub("input_layernorm"), [sub(arch.q_proj), sub(arch.k_proj), sub(arch.v_proj)], arch.norm_plus_one)
        mlp_in = [sub(n) for n in (arch.mlp_gate, arch.mlp_up) if n]
        mlp_norm = next(g.prev for g in arch.groups if arch.mlp_up in g.linears)
        _fold_norm(sub(mlp_norm), mlp_in, arch.norm_plus_one)
        for lin in [sub(arch.q_proj), sub(arch.k_proj), sub(arch.v_proj), *mlp_in]:
            reads(lin)
        writes(sub(arch.o_proj))
        writes(sub(arch.mlp_down))
    _fold_norm(model.get_submodule(arch.final_norm), [lm_head], arch.norm_plus_one)
    reads(lm_head)
