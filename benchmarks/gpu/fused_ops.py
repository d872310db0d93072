"""Fused elementwise kernels for the end-to-end decode model (benchmarks/gpu/llama.py).

Why: the plain torch decoder launches about 43 small kernels per layer besides its linears (casts, the RMSNorm's
pow/mean/rsqrt/mul, rope's stack/flatten, the cache writes, silu, mul, residual adds; benchmarks/gpu/count_layer_ops.py
-> benchmarks/results/llama_layer_ops.json). At an assumed 2-3 us each inside a CUDA graph (not measured here) that
would be 2.5-4 ms per token for 32 layers, about as long as fp16 spends reading its 13.5 GB of weights, which would
hide any kernel speed-up (the H200 run's
W2A16 decode was 1.01x fp16 while its GEMV was 1.78x). Fused, a layer takes 5 of these kernels plus attention:
add + RMSNorm (twice), rope + KV-cache write (reading the fused qkv projection), silu * up (reading the fused
gate/up projection).

Each kernel computes what the torch path in llama.py computes, with the same roundings to fp16 (checked on the CPU
in Triton's interpreter by tests/test_benchmark_llama.py). Imported lazily: importing it imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, h_ptr, y_ptr, D, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """h = x + d (rounded to fp16, the new residual), y = fp16(h * rsqrt(mean(h^2) + eps)) * w, one row a program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    h = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        h = (h.to(tl.float32) + tl.load(d_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + row * D + cols, h, mask=ok)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
    n = (hf * inv).to(h.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (n * w).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, T, H, S,
                      HALF: tl.constexpr):
    """Program (b, t, h): from qkv [B, T, 3 H D] (the fused projection), rotate head h of q and k at step t by rope
    (pairs 2i, 2i+1; cos/sin of position pos[t]), write q to qo [B, H, T, D] and k, v into the caches [B, H, S, D]
    at row pos[t]."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    i = tl.arange(0, HALF)
    D: tl.constexpr = 2 * HALF
    q_src = (b * T + t) * 3 * H * D + h * D
    k_src = q_src + H * D
    v_src = k_src + H * D
    p = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + p * HALF + i)
    s = tl.load(sin_ptr + p * HALF + i)
    q1 = tl.load(qkv_ptr + q_src + 2 * i).to(tl.float32)
    q2 = tl.load(qkv_ptr + q_src + 2 * i + 1).to(tl.float32)
    k1 = tl.load(qkv_ptr + k_src + 2 * i).to(tl.float32)
    k2 = tl.load(qkv_ptr + k_src + 2 * i + 1).to(tl.float32)
    dst_q = ((b * H + h) * T + t) * D
    dst_c = ((b * H + h) * S + p) * D
    ty = qo_ptr.dtype.element_ty
    tl.store(qo_ptr + dst_q + 2 * i, (q1 * c - q2 * s).to(ty))
    tl.store(qo_ptr + dst_q + 2 * i + 1, (q1 * s + q2 * c).to(ty))
    tl.store(kc_ptr + dst_c + 2 * i, (k1 * c - k2 * s).to(ty))
    tl.store(kc_ptr + dst_c + 2 * i + 1, (k1 * s + k2 * c).to(ty))
    tl.store(vc_ptr + dst_c + 2 * i, tl.load(qkv_ptr + v_src + 2 * i))
    tl.store(vc_ptr + dst_c + 2 * i + 1, tl.load(qkv_ptr + v_src + 2 * i + 1))


@triton.jit
def silu_mul_kernel(gu_ptr, y_ptr, numel, F, BLOCK: tl.constexpr):
    """From gu [rows, 2 F] (the fused gate/up projection): y [rows, F] = fp16(silu(gate)) * up, as F.silu(g) * u
    rounds."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    r = offs // F
    src = offs + r * F  # row r's gate at r * 2F + i, its up F further
    g = tl.load(gu_ptr + src, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    u = tl.load(gu_ptr + src + F, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (a * u).to(y_ptr.dtype.element_ty), mask=ok)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(h, y): h = x + delta (x itself when delta is None), y = RMSNorm(h) * weight; rows of the last dim."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    h = torch.empty_like(x2) if delta is not None else x2
    y = torch.empty_like(x2)
    block = triton.next_power_of_2(d)
    add_rmsnorm_kernel[(x2.shape[0],)](x2, delta.reshape(-1, d) if delta is not None else x2, weight, h, y, d, eps,
                                       HAS_DELTA=delta is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return h.view(x.shape), y.view(x.shape)


def rope_cache(qkv, cos, sin, pos, k_cache, v_cache):
    """qkv [B, T, 3 H D] (contiguous) -> rotated q [B, H, T, D]; rotated k and v written at pos into the caches."""
    b, t, _ = qkv.shape
    _, heads, s, dh = k_cache.shape
    qo = torch.empty(b, heads, t, dh, dtype=qkv.dtype, device=qkv.device)
    rope_cache_kernel[(b, t, heads)](qkv.contiguous(), cos, sin, pos, qo, k_cache, v_cache, t, heads, s,
                                     HALF=dh // 2, num_warps=1)
    return qo


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [..., 2 F] -> silu(gate) * up [..., F]."""
    f = gu.shape[-1] // 2
    gu = gu.contiguous()
    y = torch.empty(*gu.shape[:-1], f, dtype=gu.dtype, device=gu.device)
    block = 1024
    silu_mul_kernel[(triton.cdiv(y.numel(), block),)](gu, y, y.numel(), f, BLOCK=block, num_warps=4)
    return y
