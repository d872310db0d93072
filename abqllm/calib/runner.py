"""Block-by-block quantization: capture the first block's inputs, then quantize one decoder block at a
time while carrying two streams, the float one (outputs of float blocks) and the quantized one
(outputs of already-quantized blocks). Methods see one block through a BlockContext; only one
block sits on the compute device at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from abqllm.calib.artifacts import ArtifactStore
from abqllm.calib.memory import peak_mb, reset_peak
from abqllm.errors import AbqError
from abqllm.models.arch import ArchSpec, arch_for, block_linears, decoder_blocks
from abqllm.nn.qlinear import QuantLinear
from abqllm.quant.hadamard import rotated_block
from abqllm.spec import QuantSpec


@dataclass
class BlockContext:
    index: int
    num_blocks: int
    prefix: str                     # full module name of the block, e.g. "model.layers.3"
    block: nn.Module                # still float when the method gets it
    linears: dict[str, nn.Linear]   # relative name -> float linear, forward order, skipped ones removed
    arch: ArchSpec
    spec: QuantSpec
    device: torch.device
    x_fp: torch.Tensor | None       # [n, L, d] block inputs from the float stream (None: no data)
    x_q: torch.Tensor | None        # same from the quantized stream
    kwargs: dict = field(default_factory=dict)  # the block's other forward arguments (rotary, mask, ...)
    batch_size: int = 8

    def foldable(self, group) -> bool:
        """Whether a per-channel scale can be folded between `group`'s producer and its linears: it has
        a producer, and no linear of it rotates its input online (a scale does not commute with H)."""
        return group.prev is not None and not any(
            rotated_block(self.block.get_submodule(n)) for n in group.linears)

    def run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return run_block(block, x, self.kwargs, self.batch_size, self.device)

    def input_ranges(self, x: torch.Tensor) -> dict[str, tuple[float, float]]:
        """Observed (min, max) of each linear's input when `x` goes through the block."""
        ranges: dict[str, tuple[float, float]] = {}

        def hook(name):
            def fn(_module, args):
                a = args[0].detach()
                lo, hi = ranges.get(name, (float("inf"), float("-inf")))
                ranges[name] = (min(lo, a.min().item()), max(hi, a.max().item()))
            return fn

        with _hooks([(lin, hook(n)) for n, lin in self.linears.items()]):
            self.run(self.block, x)
        return ranges


class Method(Protocol):
    """A calibration method in two steps, so results can be stored, inspected and re-applied.

    `calibrate` looks at the float block and the streams and returns tensors (scales, clips, ...);
    it must not change the block. `apply` turns those tensors into quantized linears, and may fold
    transforms into the block's other parameters (norm weights); the runner swaps the linears in.
    """
    name: str

    def needs_data(self, spec: QuantSpec) -> bool: ...

    def calibrate(self, ctx: BlockContext) -> dict[str, torch.Tensor]: ...

    def apply(self, ctx: BlockContext, result: dict[str, torch.Tensor]) -> dict[str, QuantLinear]: ...

    def settings(self) -> dict: ...


@contextlib.contextmanager
def _hooks(pairs):
    handles = [m.register_forward_pre_hook(fn) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _output_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int, device: torch.device) -> torch.Tensor:
    outs = [_output_tensor(block(x[i:i + batch_size].to(device), **kwargs)).to(x.device)
            for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs)


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _only_first_block(model: nn.Module, arch: ArchSpec):
    """Temporarily hold just block 0 in the block list, so capturing its inputs skips the rest."""
    parent_name, _, attr = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([full[0]]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: ArchSpec, ids: torch.Tensor, batch_size: int = 8
                         ) -> tuple[torch.Tensor, list[dict]]:
    """Inputs of block 0 for every row of `ids` [n, L], and each block's keyword arguments.

    Keyword arguments (rotary embeddings, masks, ...) can differ per block (Gemma's sliding and
    global layers) but not per sample of equal length, so they are captured once from one
    full forward of a single row, and block 0's hidden states from forwards of the first block only.
    """
    blocks = decoder_blocks(model, arch)
    kwargs: list[dict] = [{} for _ in blocks]
    hidden: list[torch.Tensor] = []

    def grab_kwargs(i):
        def fn(_module, args, kw):
            kwargs[i] = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values",
                                                                    "past_key_value", "use_cache")}
        return fn

    def grab_hidden(_module, args, kw):
        hidden.append((args[0] if args else kw["hidden_states"]).detach().cpu())

    handles = [b.register_forward_pre_hook(grab_kwargs(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(input_ids=ids[:1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    h = blocks[0].register_forward_pre_hook(grab_hidden, with_kwargs=True)
    try:
        with _only_first_block(model, arch):
            for i in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[i:i + batch_size], use_cache=False)
    finally:
        h.remove()
    return torch.cat(hidden), kwargs


@dataclass
class BlockReport:
    index: int
    seconds: float
    peak_mem_mb: float | None


def _check_finite(prefix: str, linears: dict[str, nn.Module]):
    for name, lin in linears.items():
        if not torch.isfinite(lin.weight).all():
            bad = (~torch.isfinite(lin.weight)).sum().item()
            raise AbqError(f"{prefix}.{name}.weight holds {bad} NaN/inf values; the float model is broken, "
                           "fix or re-download its weights before quantizing")


def quantize_blocks(model: nn.Module, spec: QuantSpec, method: Method, calib_ids: torch.Tensor | None = None,
                    device: torch.device | str | None = None, batch_size: int = 8, progress: bool = True,
                    store: ArtifactStore | None = None, seed: int = 0) -> tuple[dict[str, dict], list[BlockReport]]:
    """Quantize every decoder block in place. Returns {full linear name: LayerSpec dict} and timings.

    With a `store`, each block's calibration result is saved as soon as it is made, and blocks
    that already have one are re-applied instead of calibrated (resume, or re-apply).
    """
    arch = arch_for(model.config)
    blocks = decoder_blocks(model, arch)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    needs_data = method.needs_data(spec)
    x_fp = x_q = None
    kwargs = [{} for _ in blocks]
    if needs_data:
        if calib_ids is None:
            raise AbqError(f"method {method.name} with {spec.name} needs calibration data; pass calib_ids / --data")
        x_fp, kwargs = capture_block_inputs(model, arch, calib_ids.to(home), batch_size)
        x_q = x_fp.clone()
    layers: dict[str, dict] = {}
    reports: list[BlockReport] = []
    for i, block in enumerate(tqdm(blocks, desc=f"{method.name} {spec.name}", disable=not progress, unit="block")):
        t0 = time.perf_counter()
        reset_peak(device)
        prefix = f"{arch.blocks}.{i}"
        block.to(device)
        linears = {n: m for n, m in block_linears(block, arch).items() if not spec.is_skipped(f"{prefix}.{n}")}
        _check_finite(prefix, linears)
        ctx = BlockContext(i, len(blocks), prefix, block, linears, arch, spec, device, x_fp, x_q,
                           _to(kwargs[i], device), batch_size)
        y_fp = ctx.run(block, x_fp) if needs_data else None
        if store is not None and store.has(i):
            result = store.load(i)
        else:
            torch.manual_seed(seed + i)  # per block: a resumed run draws the same numbers
            result = method.calibrate(ctx)
            if store is not None:
                store.save(i, result)
        for name, qlayer in method.apply(ctx, result).items():
            b = rotated_block(linears[name])
            if b:  # the float layer's input rotation moves into the quantized layer
                qlayer.spec = dataclasses.replace(qlayer.spec, hadamard=b)
            block.set_submodule(name, qlayer)
            layers[f"{prefix}.{name}"] = qlayer.spec.to_dict()
        if needs_data:
            x_q, x_fp = ctx.run(block, x_q), y_fp
        block.to(home)
        reports.append(BlockReport(i, time.perf_counter() - t0, peak_mb(device)))
    return layers, reports
