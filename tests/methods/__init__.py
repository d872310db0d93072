"""Helpers shared by the method tests: a BlockContext on a tiny model, outlier channels, output errors."""

from __future__ import annotations

import torch

from abqllm.calib.runner import BlockContext, capture_block_inputs, run_block
from abqllm.models.arch import arch_for, block_linears, decoder_blocks
from abqllm.spec import QuantSpec

CPU = torch.device("cpu")


def block_context(model, spec: QuantSpec, ids: torch.Tensor, index: int = 0) -> BlockContext:
    """The context the runner would build for block `index` (both streams equal: earlier blocks float)."""
    arch = arch_for(model.config)
    blocks = decoder_blocks(model, arch)
    x, kwargs = capture_block_inputs(model, arch, ids)
    for i in range(index):
        x = run_block(blocks[i], x, kwargs[i], 8, CPU)
    block = blocks[index]
    prefix = f"{arch.blocks}.{index}"
    linears = {n: m for n, m in block_linears(block, arch).items() if not spec.is_skipped(f"{prefix}.{n}")}
    return BlockContext(index, len(blocks), prefix, block, linears, arch, spec, CPU, x, x.clone(), kwargs[index])


def linear_inputs(ctx: BlockContext, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each linear's input [tokens, K] when x runs through the (float) block."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [lin.register_forward_pre_hook(
        lambda _m, args, n=n: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).detach()))
        for n, lin in ctx.linears.items()]
    try:
        ctx.run(ctx.block, x)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@torch.no_grad()
def inject_outliers(model, channels=(3, 17, 40), factor: float = 30.0) -> None:
    """Make a few hidden channels of every norm output large, as in trained LLMs."""
    arch = arch_for(model.config)
    for block in decoder_blocks(model, arch):
        for norm in arch.norms:
            block.get_submodule(norm).weight[list(channels)] *= factor


@torch.no_grad()
def logits_error(model, reference_logits: torch.Tensor, ids: torch.Tensor) -> float:
    return (model(ids).logits - reference_logits).pow(2).mean().item()


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in before)
