import pytest
import torch

from abqllm.errors import AbqError
from abqllm.formats.packing import pack_bitplanes, pack_bits, padded_k, unpack_bitplanes, unpack_bits

SHAPES = [(1, 1), (3, 31), (2, 32), (4, 33), (5, 100), (7, 576), (2, 1536)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_plain_round_trip_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 2 ** bits, shape, generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], padded_k(shape[1]) // 32 * bits)
    out = unpack_bits(packed, bits)
    assert torch.equal(out[:, : shape[1]], codes)
    assert (out[:, shape[1]:] == 0).all()  # padding is code 0, as documented


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_bitplane_round_trip_exact(bits, shape):
    codes = torch.randint(0, 2 ** bits, shape).to(torch.uint8)
    planes = pack_bitplanes(codes, bits)
    assert planes.shape == (bits, shape[0], padded_k(shape[1]) // 32)
    assert torch.equal(unpack_bitplanes(planes)[:, : shape[1]], codes)


def test_layout_matches_the_docstring():
    codes = torch.arange(8, dtype=torch.uint8).repeat(1, 4)  # 0..7 repeated
    assert pack_bits(codes, 4)[0, 0].item() & 0xFFFFFFFF == 0x76543210
    # 3-bit: code j at bits 3j..3j+2 of the run's bit string; code 10 straddles words 0 and 1
    c = torch.zeros(1, 32, dtype=torch.uint8)
    c[0, 10] = 0b111
    w = pack_bits(c, 3)[0]
    assert (w[0].item() & 0xFFFFFFFF) == 0b11 << 30 and w[1].item() == 0b1
    # bit planes: plane i, word w, bit t = bit i of column 32w + t
    c = torch.zeros(1, 64, dtype=torch.uint8)
    c[0, 33] = 0b10
    p = pack_bitplanes(c, 2)
    assert p[0].abs().sum() == 0 and p[1, 0, 1].item() == 2


def test_balanced_w2star_codes_fit_three_bits():
    codes = torch.randint(0, 5, (3, 70)).to(torch.uint8)  # 5 levels {-2..2} stored as codes 0..4
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3)[:, :70], codes)


def test_out_of_range_codes_refused():
    with pytest.raises(ValueError):
        pack_bits(torch.full((1, 4), 4, dtype=torch.uint8), 2)
    with pytest.raises(AbqError):
        pack_bits(torch.zeros(1, 4, dtype=torch.uint8), 9)
