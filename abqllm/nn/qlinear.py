"""The quantized linear layer: packed integer weights + their scheme + an explicitly chosen kernel.

Buffers (all saved in checkpoints):
- qweight  int32 [N, K_pad/32 * storage_bits]  codes in the plain packed layout (formats/packing.py)
- scales   float16 [N, G]                      per output channel (G = 1) or per group of columns
- zeros    uint8 [N, G]                        zero points (codes of the value 0)
- bias     float [N]                           when the float layer had one
- act_scale, act_zero float32 [1]              only for static per-tensor activation quantization
The layer computes y = Q_a(x) @ (s_w * (u - z))^T + b through the kernel registry; see
abqllm/kernels/reference.py for the arithmetic. With `spec.hadamard` = b the stored weight is the
rotated W H, and forward rotates x -> x H first (quant/hadamard.py), whatever the kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from abqllm.formats.packing import WORD, pack_bits, padded_k, unpack_bits
from abqllm.kernels import registry
from abqllm.quant import primitives as P
from abqllm.quant.hadamard import rotate_last_dim
from abqllm.spec import LayerSpec


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, bias: bool = False,
                 dtype: torch.dtype = torch.float32, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.kernel = kernel
        w = spec.weight
        groups = P.num_groups(in_features, w.group_size)
        self.register_buffer("qweight", torch.zeros(out_features, padded_k(in_features) // WORD * w.storage_bits,
                                                    dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        if not spec.act.is_float and not spec.act.dynamic:
            self.register_buffer("act_scale", torch.ones(1))
            self.register_buffer("act_zero", torch.zeros(1))
        self._dequant_cache: tuple[tuple, torch.Tensor] | None = None
        self._kernel_cache: dict = {}  # kernel-specific layouts of the weights (kernels/kpacked_linear.py)

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: LayerSpec, scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None, act_range: tuple[float, float] | None = None) -> "QuantLinear":
        """Quantize `linear.weight` with given qparams (round-to-nearest qparams if None)."""
        w = linear.weight.detach().float()
        if not torch.isfinite(w).all():
            raise ValueError("weight holds NaN or inf")
        if scale is None:
            scale, zero = P.weight_qparams(w, spec.weight)
        codes = P.quantize_weight(w, spec.weight, scale, zero)
        layer = cls(linear.in_features, linear.out_features, spec, linear.bias is not None,
                    dtype=linear.weight.dtype)
        layer.qweight.copy_(pack_bits(codes, spec.weight.storage_bits))
        layer.scales.copy_(scale.detach().half())
        layer.zeros.copy_(zero.detach().round().to(torch.uint8))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        if hasattr(layer, "act_scale"):
            if act_range is None:
                raise ValueError("static activation quantization needs the observed input range")
            s, z = P.static_act_qparams(*act_range, spec.act)
            layer.act_scale.fill_(s)
            layer.act_zero.fill_(z)
        return layer.to(linear.weight.device)

    def codes(self) -> torch.Tensor:
        """Weight codes [N, K] (uint8), unpacked from qweight."""
        return unpack_bits(self.qweight, self.spec.weight.storage_bits)[:, : self.in_features]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s * (u - z) as a dense [N, K] tensor, cached until the packed buffers change."""
        # Which tensors, and how often each was written in place: a reassigned buffer or an
        # in-place update both invalidate the cache.
        version = tuple((id(t), t._version) for t in (self.qweight, self.scales, self.zeros))
        cache = self._dequant_cache
        if cache is None or cache[0] != version or cache[1].dtype != dtype or cache[1].device != self.qweight.device:
            w = P.dequantize_weight(self.codes(), self.scales, self.zeros, self.spec.weight.group_size, dtype)
            self._dequant_cache = cache = (version, w)
        return cache[1]

    def _apply(self, fn, recurse=True):
        self._dequant_cache = None  # moved or cast: the caches would point at the old device/dtype
        self._kernel_cache = {}
        return super()._apply(fn, recurse)

    def act_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "act_scale"):
            return self.act_scale, self.act_zero
        return P.act_qparams(x, self.spec.act)

    def rotated_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the kernels take it: rotated when the layer has an online Hadamard, else as is."""
        return rotate_last_dim(x, self.spec.hadamard) if self.spec.hadamard else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.rotated_input(x)
        rows = x.numel() // max(1, x.shape[-1])
        return registry.select("linear", self.kernel, self, x.device, rows).fn(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.spec.name}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")
