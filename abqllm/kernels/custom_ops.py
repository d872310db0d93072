"""The fast kernels as torch.library custom ops, each with a fake (meta) implementation.

torch.compile traces through a custom op as one opaque node whose output shape comes from the fake
implementation, and CUDA graphs capture whatever the op launches (the kernels allocate with torch and
never synchronize with the host). Ops:

- abqllm::act_quant(x [M, K], bits, symmetric, act_scale?, act_zero?) -> (xq int8 [M, K], s f32 [M], a i32 [M])
- abqllm::triton_qlinear(x [..., K], qweight, scales, zeros, bias?, act_scale?, act_zero?, in_features,
  storage_bits, group_size, act_bits, act_symmetric) -> y [..., N] in x's dtype
- abqllm::bmma_qlinear(same arguments) -> y: the CUDA bit-plane (mma.sync b1 AND+popc) kernel.
- abqllm::kp_gemv(x, qweight_t, scales_t, zeros_t, bias?, act_scale?, act_zero?, in_features, bits, group_size,
  act_bits, act_symmetric) -> y: the decode GEMV on the k-packed layout (kernels/kpacked.py). Its split-K
  workspace is left zero after each launch, so the op is a pure function of its inputs.
- abqllm::kp_gemm(same arguments) -> y: any M on the k-packed layout, tensor cores.
- abqllm::dense_qlinear(same arguments) -> y: prefill, the k-packed weights expanded for a cuBLAS GEMM
  (kernels/dense_prefill.py).
- abqllm::cuda_gemv(same arguments) -> y: the hand-written CUDA decode GEMV (kernels/cuda_gemv.py), fp16 x.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from abqllm.kernels import dense_prefill, kpacked_linear, triton_linear


@torch.library.custom_op("abqllm::act_quant", mutates_args=())
def act_quant(x: Tensor, bits: int, symmetric: bool, act_scale: Optional[Tensor] = None,
              act_zero: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return triton_linear.act_quant(x, bits, symmetric, act_scale, act_zero)


@act_quant.register_fake
def _(x, bits, symmetric, act_scale=None, act_zero=None):
    m, k = x.shape
    return (x.new_empty(m, k, dtype=torch.int8), x.new_empty(m, dtype=torch.float32),
            x.new_empty(m, dtype=torch.int32))


@torch.library.custom_op("abqllm::triton_qlinear", mutates_args=())
def triton_qlinear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                   act_scale: Optional[Tensor], act_zero: Optional[Tensor], in_features: int, storage_bits: int,
                   group_size: int, act_bits: int, act_symmetric: bool) -> Tensor:
    return triton_linear.qlinear(x, qweight, scales, zeros, bias, act_scale, act_zero, in_features, storage_bits,
                                 group_size, act_bits, act_symmetric)


@triton_qlinear.register_fake
def _(x, qweight, scales, zeros, bias, act_scale, act_zero, in_features, storage_bits, group_size, act_bits,
      act_symmetric):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("abqllm::bmma_qlinear", mutates_args=())
def bmma_qlinear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                 act_scale: Optional[Tensor], act_zero: Optional[Tensor], in_features: int, storage_bits: int,
                 group_size: int, act_bits: int, act_symmetric: bool) -> Tensor:
    from abqllm.kernels import cuda
    return cuda.qlinear(x, qweight, scales, zeros, bias, act_scale, act_zero, in_features, storage_bits,
                        group_size, act_bits, act_symmetric)


@bmma_qlinear.register_fake
def _(x, qweight, scales, zeros, bias, act_scale, act_zero, in_features, storage_bits, group_size, act_bits,
      act_symmetric):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("abqllm::kp_gemv", mutates_args=())
def kp_gemv(x: Tensor, qweight_t: Tensor, scales_t: Tensor, zeros_t: Tensor, bias: Optional[Tensor],
            act_scale: Optional[Tensor], act_zero: Optional[Tensor], in_features: int, bits: int, group_size: int,
            act_bits: int, act_symmetric: bool) -> Tensor:
    return kpacked_linear.kp_gemv(x, qweight_t, scales_t, zeros_t, bias, act_scale, act_zero, in_features, bits,
                                  group_size, act_bits, act_symmetric)


def _kp_fake(x, qweight_t, *args):  # both k-packed ops: y [..., N], N = qweight_t's columns
    return x.new_empty(*x.shape[:-1], qweight_t.shape[1])


kp_gemv.register_fake(_kp_fake)


@torch.library.custom_op("abqllm::kp_gemm", mutates_args=())
def kp_gemm(x: Tensor, qweight_t: Tensor, scales_t: Tensor, zeros_t: Tensor, bias: Optional[Tensor],
            act_scale: Optional[Tensor], act_zero: Optional[Tensor], in_features: int, bits: int, group_size: int,
            act_bits: int, act_symmetric: bool) -> Tensor:
    return kpacked_linear.kp_gemm(x, qweight_t, scales_t, zeros_t, bias, act_scale, act_zero, in_features, bits,
                                  group_size, act_bits, act_symmetric)


kp_gemm.register_fake(_kp_fake)


@torch.library.custom_op("abqllm::dense_qlinear", mutates_args=())
def dense_qlinear(x: Tensor, qweight_t: Tensor, scales_t: Tensor, zeros_t: Tensor, bias: Optional[Tensor],
                  act_scale: Optional[Tensor], act_zero: Optional[Tensor], in_features: int, bits: int,
                  group_size: int, act_bits: int, act_symmetric: bool) -> Tensor:
    return dense_prefill.dense_qlinear(x, qweight_t, scales_t, zeros_t, bias, act_scale, act_zero, in_features, bits,
                                       group_size, act_bits, act_symmetric)


dense_qlinear.register_fake(_kp_fake)


@torch.library.custom_op("abqllm::cuda_gemv", mutates_args=())
def cuda_gemv(x: Tensor, qweight_t: Tensor, scales_t: Tensor, zeros_t: Tensor, bias: Optional[Tensor],
              act_scale: Optional[Tensor], act_zero: Optional[Tensor], in_features: int, bits: int, group_size: int,
              act_bits: int, act_symmetric: bool) -> Tensor:
    from abqllm.kernels import cuda_gemv as CG
    return CG.cuda_gemv(x, qweight_t, scales_t, zeros_t, bias, act_scale, act_zero, in_features, bits, group_size,
                        act_bits, act_symmetric)


cuda_gemv.register_fake(_kp_fake)
