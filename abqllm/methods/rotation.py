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


def switched_off_channels(model: nn.Module, arch: ArchSpec, rel: float = 0.02, share: float = 0.25) -> list[int]:
    """Residual channels whose norm weight is ~0 (< rel x the norm's median |weight|) in at least `share`
    of the blocks' norms. These are the channels that carry massive activations (SmolLM2-135M: channel
    507 reaches 25,674 while its post-attention norm weight is 3e-4): the model writes a huge value
    there and every reader multiplies it by ~0. A rotation would spread it over all channels, where
    only exact weights cancel it again, and weight quantization error no longer does."""
    ws = []
    for block in decoder_blocks(model, arch):
        for name in ("input_layernorm", next(g.prev for g in arch.groups if arch.mlp_up in g.linears)):
            w = block.get_submodule(name).weight.detach().float()
            w = (1 + w) if arch.norm_plus_one else w
            ws.append(w.abs())
    w = torch.stack(ws)
    tiny = w < rel * w.median(dim=1, keepdim=True).values
    return tiny.float().mean(0).ge(share).nonzero().flatten().tolist()


def rotation_matrix(d: int, seed: int, keep: list[int]) -> torch.Tensor:
    """Random orthogonal d x d acting as the identity on the `keep` channels."""
    q = torch.eye(d, dtype=torch.float64)
    keep = set(keep)
    rest = torch.tensor([i for i in range(d) if i not in keep])
    q[rest[:, None], rest[None, :]] = random_orthogonal(len(rest), seed)
    return q


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, keep_switched_off: bool = False) -> None:
    """Fold norms and rotate the residual stream in place; the model computes the same function.

    keep_switched_off: leave the channels of `switched_off_channels` out of the rotation. Off: on the
    default model it helps weight-only RTN (W4A16+rot 70.98 -> 46.58) but not enough to beat no rotation
    (35.60), and it ruins 4-bit activations (W4A4+rot+had:512 227.8 -> 12675), whose per-token scale the
    unspread massive channel then sets (benchmarks/rotation_keep_probe.py)."""
    arch = arch_for(model.config)
    check_rotatable(arch)
    embed = model.get_submodule(arch.embed)
    lm_head = model.get_submodule(arch.lm_head)
    if lm_head.weight is embed.weight:  # untie: the two now get different transforms
        lm_head.weight = nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
    q = rotation_matrix(embed.weight.shape[1], seed, switched_off_channels(model, arch) if keep_switched_off else [])
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
