"""Packed layouts for b-bit codes (b = 1..8), exact round trips.

Both layouts work on rows of codes [N, K] (uint8, values < 2^b) and pad K up to a multiple of 32
with code 0. The padding is part of the format: unpack returns [N, K_pad] and callers slice to K
(they know K from the layer). Code 0 is chosen so padded columns add nothing to integer dot
products of raw codes; the integer engine counts only the real columns in its zero-point terms.

Plain ("bitstream") layout, `pack_bits`: each run of 32 codes along K becomes exactly b int32 words.
Inside a run, code j occupies bits [j*b, (j+1)*b) of the run's 32*b-bit little-endian bit string
(bit t of that string is bit t % 32 of word t // 32). For b in {1, 2, 4, 8} this is the familiar
"32/b codes per word, code j at bits j*b" packing; for b in {3, 5, 6, 7} a code may straddle two
words. Shape: [N, K_pad // 32 * b] int32 (two's complement reinterpretation of uint32 words).

Bit-plane layout, `pack_bitplanes` (ABQ-LLM): plane i holds bit i of every code, 32 columns per
word, column 32*w + t at bit t of word w. Shape: [b, N, K_pad // 32] int32. A b-bit matrix
product becomes a sum of 1-bit products of planes (see kernels/reference.py).
"""

from __future__ import annotations

import torch

from abqllm.errors import AbqError

WORD = 32
_BIT_WEIGHTS = 1 << torch.arange(WORD, dtype=torch.int64)  # value of bit t in a word


def padded_k(k: int) -> int:
    return -(-k // WORD) * WORD


def _check_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if not 1 <= bits <= 8:
        raise AbqError(f"pack width must be 1..8 bits, got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2 ** bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    pad = padded_k(c.shape[1]) - c.shape[1]
    return torch.nn.functional.pad(c, (0, pad)) if pad else c


def _words_from_bits(bitarr: torch.Tensor) -> torch.Tensor:
    """[..., 32] of 0/1 int64 -> [...] int32 words (bit t at position t)."""
    words = (bitarr * _BIT_WEIGHTS.to(bitarr.device)).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret uint32 as int32


def _bits_from_words(words: torch.Tensor) -> torch.Tensor:
    """[...] int32 -> [..., 32] int64 bits."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    return (w.unsqueeze(-1) >> torch.arange(WORD, device=w.device)) & 1


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    c = _check_codes(codes, bits)
    n, kp = c.shape
    # [N, runs, 32 codes, b bits] -> bit string of 32*b bits per run, code-major then bit-minor.
    bitarr = (c.reshape(n, kp // WORD, WORD, 1) >> torch.arange(bits, device=c.device)) & 1
    bitarr = bitarr.reshape(n, kp // WORD, bits, WORD)  # same bit string, cut into b words
    return _words_from_bits(bitarr).reshape(n, kp // WORD * bits)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    n, nw = packed.shape
    if nw % bits:
        raise AbqError(f"packed tensor width {nw} is not a multiple of {bits} words: corrupt or wrong bit width")
    runs = nw // bits
    bitarr = _bits_from_words(packed.reshape(n, runs, bits)).reshape(n, runs, WORD, bits)
    codes = (bitarr << torch.arange(bits, device=packed.device)).sum(-1)
    return codes.reshape(n, runs * WORD).to(torch.uint8)


def pack_bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    c = _check_codes(codes, bits)
    n, kp = c.shape
    planes = (c.unsqueeze(0) >> torch.arange(bits, device=c.device).view(bits, 1, 1)) & 1  # [b, N, Kp]
    return _words_from_bits(planes.reshape(bits, n, kp // WORD, WORD))


def unpack_bitplanes(planes: torch.Tensor) -> torch.Tensor:
    bits, n, nw = planes.shape
    bitarr = _bits_from_words(planes).reshape(bits, n, nw * WORD)
    weights = (1 << torch.arange(bits, device=planes.device)).view(bits, 1, 1)
    return (bitarr * weights).sum(0).to(torch.uint8)
