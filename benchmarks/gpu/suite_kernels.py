"""Our kernels as the GPU suite runs them: one table shared by the warm-up (compile ahead), the correctness check
(every kernel against the float64 reference) and the timings, so that nothing is timed that was not checked.

CHECKED: each low-level launcher on its own, output poisoned with NaN first.
TIMED: the rows of the kernel table, named as the registry names them ('triton' is what `auto` runs: the k-packed
GEMV at M = 1, qlinear_kernel above; the others are the named kernels), each at the M where it is a candidate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from abqllm.kernels import cuda as CU
from abqllm.kernels import cuda_gemv as CG
from abqllm.kernels import dense_prefill as DP
from abqllm.kernels import kpacked_linear as KL
from abqllm.kernels import triton_linear as TL
from abqllm.quant import primitives as P


@dataclass(frozen=True)
class Checked:
    name: str
    run: Callable  # (layer, x, out) -> y (writes out where the launcher takes one)
    serves: Callable  # (layer, x) -> bool
    rounds_weights: bool = False  # a float GEMM on weights rounded to x's dtype: the tolerance widens by that


def _cuda_gemv(layer, x, out):
    return CG.cuda_gemv(x, **KL.layer_kp_args(layer), out=out, emulate=x.device.type == "cpu")


def _gemv_serves_device(layer, device: torch.device) -> bool:
    """On a GPU: the registry's answer; on the CPU (the suite's dry run): the kernel's code emulated, if built."""
    if device.type == "cuda":
        return CG.supports(layer, device)
    return CU.find_nvcc() is not None and layer.out_features % 4 == 0


def _cuda_gemv_serves(layer, x) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16) and _gemv_serves_device(layer, x.device)


CHECKED = [
    Checked("qlinear_kernel", lambda L, x, o: TL.qlinear(x, **TL.layer_args(L), out=o), lambda L, x: True),
    Checked("kp_gemv", lambda L, x, o: KL.kp_gemv(x, **KL.layer_kp_args(L), out=o), lambda L, x: True),
    Checked("kp_gemm", lambda L, x, o: KL.kp_gemm(x, **KL.layer_kp_args(L), out=o), lambda L, x: True),
    Checked("dense", lambda L, x, o: DP.dense_qlinear(x, **KL.layer_kp_args(L), out=o), lambda L, x: True,
            rounds_weights=True),
    Checked("cuda-gemv", _cuda_gemv, _cuda_gemv_serves),
    Checked("cuda-bmma", lambda L, x, o: CU.qlinear(x, **TL.layer_args(L)), lambda L, x: CU.supports(L, x.device)),
]


def rounding_slack(layer, x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2u sum_k |x_k| |w_k|: what rounding the dequantized weights (and fake-quantized activations) to `dtype`
    before a float GEMM may add to the error (u = 2^-11 for fp16, 2^-8 for bf16)."""
    xf = x64
    if not layer.spec.act.is_float:
        xf = P.fake_quant_act(xf, layer.spec.act, *layer.act_qparams(xf))
    u = 2.0 ** -11 if dtype == torch.float16 else 2.0 ** -8
    return 2 * u * (xf.abs() @ layer.dequantized_weight(torch.float64).abs().T)


@dataclass(frozen=True)
class Timed:
    name: str
    when: Callable  # (m, act_bits) -> bool: a candidate at this M
    run: Callable  # (layer, x) -> y
    serves: Callable  # (layer, device) -> bool
    prepare: Callable | None = None  # (layer) -> None: layouts built outside the timing


TIMED = [
    Timed("triton", lambda m, a: True, TL.linear_triton, lambda L, d: True),
    Timed("cuda-gemv", lambda m, a: m <= CG.GEMV_MAX_M, lambda L, x: _cuda_gemv(L, x, None), _gemv_serves_device),
    # (decode batches: from 64 rows the dense path is the k-packed layout's candidate)
    Timed("triton-kpacked", lambda m, a: 1 < m <= 16, lambda L, x: KL.kp_gemm(x, **KL.layer_kp_args(L)),
          lambda L, d: True),
    Timed("triton-dense", lambda m, a: m >= 64, lambda L, x: DP.dense_qlinear(x, **KL.layer_kp_args(L)),
          lambda L, d: True),
    Timed("cuda-bmma", lambda m, a: a != 16 and m <= 64, lambda L, x: CU.qlinear(x, **TL.layer_args(L)),
          lambda L, d: CU.supports(L, d),
          prepare=lambda L: CU.weight_planes(L.qweight, L.in_features, L.spec.weight.storage_bits,
                                             L.spec.weight.group_size)),
]
OURS = tuple(t.name for t in TIMED)  # a target counts our best row among these


def timed_for(m: int, act_bits: int, layer, device: torch.device) -> list[Timed]:
    """Our kernels the suite times for this layer at M rows: those that are candidates there and serve it."""
    return [t for t in TIMED if t.when(m, act_bits) and t.serves(layer, device)]
