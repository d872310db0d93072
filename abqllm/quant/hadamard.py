"""Online block-Hadamard rotation of a linear layer's input (QuaRot's rotation of the down projection;
optionally of every linear of the blocks).

A linear y = x W^T computes the same function as y = (x H)(W H)^T for any orthogonal H. With H a
block-diagonal of normalised Sylvester Hadamard matrices of size b (a power of two), x H spreads
each outlier channel of x evenly over the b channels of its block, so one per-token scale fits all of
them: the SwiGLU output that feeds down_proj has such outliers, and at 4-bit activations they are
what breaks the layer (benchmarks/results/abq_dev_runs.md: W4A4 RTN 1110.9 -> 545.1 with this alone).

The weight is rotated once, offline (W -> W H, then quantized); the input is rotated at run time,
before activation quantization, by every kernel alike (QuantLinear.forward; the native CPU decode
step does the same). On the CPU that is a fast Walsh-Hadamard transform in the extension (K log2 b
additions per token); elsewhere, and under autograd, a [.., K/b, b] x [b, b] product (K*b
multiply-adds per token against the layer's K*N; one small GEMM on a GPU).

The rotation is installed on the float model before calibration, as a forward pre-hook registered
first on the layer: the methods' own hooks (activation fake-quantization, input statistics, GPTQ's
Hessian) then see the rotated input, as the quantized layer will, and calibrate the rotated weight.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from abqllm.errors import AbqError

ATTR = "online_hadamard"  # block size on a float nn.Linear whose input is rotated (0 or absent: none)
MIN_BLOCK = 8


@functools.lru_cache(maxsize=32)
def hadamard_matrix(b: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix [b, b] (symmetric, orthogonal), b a power of two; cached per
    (b, dtype, device), so a forward pass (or a CUDA-graph capture after warm-up) builds nothing."""
    if b < 1 or b & (b - 1):
        raise AbqError(f"a Hadamard block must be a power of two, got {b}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / b ** 0.5).to(device=device, dtype=dtype)


def block_size_for(k: int, max_block: int) -> int:
    """The largest power of two <= max_block that divides k; refuses sizes where that is too small."""
    b = 1
    while b * 2 <= max_block and k % (b * 2) == 0:
        b *= 2
    if b < MIN_BLOCK:
        raise AbqError(f"an input of {k} columns has no power-of-two Hadamard block of at least {MIN_BLOCK} "
                       f"(largest divisor found: {b}); drop --hadamard for this model")
    return b


def rotate_last_dim(x: torch.Tensor, b: int) -> torch.Tensor:
    """x @ blockdiag(H_b, ..., H_b) over the last dimension (its size a multiple of b).

    float32 on the CPU without autograd: the CPU extension's fast Walsh-Hadamard transform (b log2 b
    additions per block, the same code the native decode step runs). Otherwise a dense product with
    H_b in x's dtype (float16/bfloat16 on the CPU go through float32); on a GPU that is one small GEMM.
    """
    k = x.shape[-1]
    if k % b:
        raise AbqError(f"input of {k} columns cannot take Hadamard blocks of {b}; the layer is inconsistent")
    if x.dtype == torch.float32 and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        fast = _cpu_transform()
        if fast is not None:
            return fast(x, b)
    dt = x.dtype if (x.is_cuda or x.dtype in (torch.float32, torch.float64)) else torch.float32
    h = hadamard_matrix(b, dt, x.device)
    y = (x.to(dt).reshape(*x.shape[:-1], k // b, b) @ h).reshape(x.shape)
    return y.to(x.dtype)


def _cpu_transform():
    from abqllm.kernels import cpu as cpu_kernels

    return cpu_kernels.module().hadamard_transform if cpu_kernels.available() else None


def _pre_hook(module: nn.Module, args):
    return (rotate_last_dim(args[0], getattr(module, ATTR)), *args[1:])


@torch.no_grad()
def install(linear: nn.Linear, max_block: int) -> int:
    """Rotate `linear`'s weight (W -> W H) and its input (a pre-hook registered before any other), in place;
    the layer computes the same function. Returns the block size used."""
    if getattr(linear, ATTR, 0):
        raise AbqError("this layer already has an online Hadamard rotation; load the float model again")
    if linear._forward_pre_hooks:
        raise AbqError("the online Hadamard must be the layer's first input hook; install it before calibrating")
    b = block_size_for(linear.in_features, max_block)
    w = linear.weight
    linear.weight.data = rotate_last_dim(w.data.double(), b).to(w.dtype)
    setattr(linear, ATTR, b)
    linear.register_forward_pre_hook(_pre_hook)
    return b


def rotated_block(linear: nn.Module) -> int:
    """Block size of a float linear's online rotation, 0 when it has none."""
    return int(getattr(linear, ATTR, 0) or 0)


def install_on_blocks(model: nn.Module, max_block: int, is_skipped, layers: str = "down") -> dict[str, int]:
    """`install` on the quantized linears (`is_skipped(full name)` false) of every decoder block: the down
    projection only (layers="down") or every linear ("all"). A skipped one stays as it is: it is saved
    float, and a checkpoint has no place for its rotation. Returns {full name: block size}.

    "all" also rotates q/k/v, o and gate/up. At 4-bit activations that is what counts (RTN W4A4 514 -> 63.6 on
    the default model); for weight-only RTN it costs a little (W4A16 33.8 -> 36.1): benchmarks/results/
    abq_dev_runs.md, "The online Hadamard on other linears".
    """
    from abqllm.models.arch import arch_for, block_linears, decoder_blocks

    arch = arch_for(model.config)
    if layers == "down" and not arch.mlp_down:
        raise AbqError(f"{arch.name} has no down projection to rotate; drop --hadamard")
    done = {}
    for i, block in enumerate(decoder_blocks(model, arch)):
        names = [arch.mlp_down] if layers == "down" else list(block_linears(block, arch))
        for rel in names:
            name = f"{arch.blocks}.{i}.{rel}"
            if not is_skipped(name):
                done[name] = install(block.get_submodule(rel), max_block)
    return done
