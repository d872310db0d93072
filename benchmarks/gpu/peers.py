"""Optional peer low-bit kernels for the GPU suite: GemLite (pure Python + Triton), when it can be imported.

GemLite is not among the GPU machine's packages; carry it as a wheel (benchmarks/gpu/fetch_peer_wheels.sh
builds one into .whl/, which gpu_suite.sh installs). Everything here is defensive: a peer that is missing or
fails is reported as such and never stops the suite. GemLite 0.6 API used: gemlite.helper.A16Wn (W8/4/2/1
with fp16 activations, groups), A8W8_int8_dynamic (W8A8), A8Wn_HQQ_INT_dynamic (W4A8/W8A8 with groups).
Same quantization convention as ours: W = (W_q - zeros) * scales, W_q [N, K] codes.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> str | None:
    try:
        import gemlite  # noqa: F401
    except Exception:  # noqa: BLE001  (any import problem means: no peer)
        return None
    return f"gemlite {getattr(gemlite, '__version__', '?')}"


def _make(bits: int, a: int, gs: int, n: int, k: int, dev):
    from gemlite import helper
    g = gs or k
    w_q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, device=dev)
    scales = (torch.rand(n, k // g, device=dev) * 1e-2 + 5e-3).half()
    zeros = torch.randint(0, 2 ** bits, (n, k // g), device=dev).half()
    if a == 16 and bits in (8, 4, 2, 1):
        return helper.A16Wn(device=str(dev), dtype=torch.float16).from_weights(w_q, scales, zeros, W_nbits=bits,
                                                                               group_size=g)
    if a == 8 and bits == 8 and gs == 0:
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        return helper.A8W8_int8_dynamic(device=str(dev), dtype=torch.float16).from_weights(w)
    if a == 8 and bits in (4, 8):
        return helper.A8Wn_HQQ_INT_dynamic(device=str(dev), dtype=torch.float16, W_nbits=bits).from_weights(
            w_q, scales, zeros)
    return None


def time_peer(scheme: str, bits: int, balanced: bool, a: int, gs: int, m: int, n: int, k: int, copies: int, dev,
              timer) -> dict | None:
    """Time the peer's kernel for this scheme if it has one; None when it does not support the scheme."""
    name = available()
    if name is None or balanced or (gs and k % gs):
        return None
    try:
        layers = [_make(bits, a, gs, n, k, dev) for _ in range(copies)]
        if layers[0] is None:
            return None
        xs = [torch.randn(m, k, device=dev, dtype=torch.float16) for _ in range(copies)]
        t = timer([lambda L=L, x=x: L(x) for L, x in zip(layers, xs)])
        return dict(kernel=name, scheme=scheme, s=t["s"], mode=t["mode"])
    except Exception as e:  # noqa: BLE001
        return dict(kernel=name, scheme=scheme, error=f"{type(e).__name__}: {e}"[-300:])
