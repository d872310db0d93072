"""The GPU decode layout ("k-packed"): weight codes packed along K into int32 words, stored N-contiguous.

Why a second layout: the checkpoint's bitstream layout (formats/packing.py) keeps each output row's words
contiguous, so a GEMV whose threads run along N reads one 16-byte vector from a different row per thread.
The first H100 run (benchmarks/results/gpu_h100_2026-11-28.md) put every M = 1 kernel reading it at
0.1-0.3 of the memory roofline, while GemLite, which stores words N-contiguous, reached 0.56. Here:

    PER = 32 // b codes per word, code j of a word at bits [j*b, j*b + b)  (no code straddles two words;
          for b = 3, 5, 6, 7 the top 2, 2, 2, 4 bits of each word are unused)
    SEG = group_size, or K for per-channel scales (one segment); G = ceil(K / SEG) segments
    WPG = ceil(SEG / PER) words per segment (a segment's last word is padded with code 0)
    qweight_t [G * WPG, N] int32: word (g * WPG + i, n), slot j = code of column g * SEG + i * PER + j of row n
    scales_t [G, N] fp16, zeros_t [G, N] uint8 (the layer's scales and zeros, transposed)

Every word holds codes of one segment only, so a kernel can apply a segment's scale per word. Codes past K
(the last segment of a K that is not a multiple of SEG) are 0 and the kernel masks their activations.
Sizes: the same bytes as the bitstream for b in {1, 2, 4, 8} (up to the last word of a segment), +6.7%
for b = 3, 5, 6 and +14% for b = 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abqllm.formats.packing import WORD, unpack_bits

# Rows repacked at a time: bounds the int64 temporaries (8 bytes per code) of the conversion.
_ROWS_PER_CHUNK = 1024


def codes_per_word(bits: int) -> int:
    return WORD // bits


def segment_length(k: int, group_size: int) -> int:
    return group_size if group_size else k


def words_per_segment(k: int, group_size: int, bits: int) -> int:
    return -(-segment_length(k, group_size) // codes_per_word(bits))


@dataclass(frozen=True)
class KPacked:
    """A linear layer's weights in the k-packed layout (see the module docstring)."""
    qweight_t: torch.Tensor  # [G * WPG, N] int32
    scales_t: torch.Tensor  # [G, N] fp16
    zeros_t: torch.Tensor  # [G, N] uint8
    in_features: int
    bits: int
    group_size: int

    @property
    def seg(self) -> int:
        return segment_length(self.in_features, self.group_size)

    @property
    def wpg(self) -> int:
        return words_per_segment(self.in_features, self.group_size, self.bits)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight_t, self.scales_t, self.zeros_t))


def pack_codes(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes [N, K] (uint8, < 2^bits) -> qweight_t [G * WPG, N] int32."""
    n, k = codes.shape
    per, seg = codes_per_word(bits), segment_length(k, group_size)
    groups, wpg = -(-k // seg), words_per_segment(k, group_size, bits)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    out = torch.empty(groups * wpg, n, dtype=torch.int32, device=codes.device)
    for r0 in range(0, n, _ROWS_PER_CHUNK):
        c = codes[r0:r0 + _ROWS_PER_CHUNK].to(torch.int64)
        c = torch.nn.functional.pad(c, (0, groups * seg - k)).reshape(-1, groups, seg)  # K padded to whole segments
        c = torch.nn.functional.pad(c, (0, wpg * per - seg)).reshape(-1, groups, wpg, per)  # segments to whole words
        words = (c << shifts).sum(-1)  # disjoint bit fields: the sum is the OR
        words = words - ((words >> 31) << 32)  # uint32 -> int32, two's complement
        out[:, r0:r0 + c.shape[0]] = words.reshape(-1, groups * wpg).t().to(torch.int32)
    return out


def unpack_codes(qweight_t: torch.Tensor, bits: int, group_size: int, k: int) -> torch.Tensor:
    """The inverse of pack_codes: qweight_t -> codes [N, K] uint8."""
    per, seg = codes_per_word(bits), segment_length(k, group_size)
    groups, wpg = -(-k // seg), words_per_segment(k, group_size, bits)
    w = qweight_t.t().to(torch.int64) & 0xFFFFFFFF  # [N, G * WPG]
    shifts = torch.arange(per, device=w.device, dtype=torch.int64) * bits
    c = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [N, G * WPG, PER]
    c = c.reshape(-1, groups, wpg * per)[:, :, :seg].reshape(-1, groups * seg)[:, :k]
    return c.to(torch.uint8)


def from_bitstream(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                   bits: int, group_size: int) -> KPacked:
    """Repack a layer's checkpoint buffers (bitstream qweight [N, K_pad/32*b], scales/zeros [N, G])."""
    # Row chunks: unpack_bits expands every bit to an int64 (256 bytes per 32-bit word) on the way.
    parts = [pack_codes(unpack_bits(qweight[r0:r0 + _ROWS_PER_CHUNK], bits)[:, :in_features], bits, group_size)
             for r0 in range(0, qweight.shape[0], _ROWS_PER_CHUNK)]
    qweight_t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return KPacked(qweight_t, scales.t().contiguous(), zeros.t().contiguous(), in_features, bits, group_size)
