"""The CUDA binary path without a GPU: the source compiles with nvcc for sm_80 and sm_90, the PTX holds the
b1 AND+popc MMA, the shared library loads and exports its launchers, and a numpy emulation of the
kernel's warp-level algorithm (fragment layout of mma.m8n8k128.b1 from the PTX ISA, the shuffle
reduction over activation planes, the zero-point epilogue) reproduces the reference engine."""
import ctypes
import subprocess

import numpy as np
import pytest
import torch

from abqllm.formats.packing import pack_bitplanes
from abqllm.kernels import cuda
from abqllm.kernels.reference import integer_dot, zero_point_epilogue

NVCC = cuda.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


@needs_nvcc
def test_compiles_for_sm80(tmp_path):
    out = tmp_path / "abq_bmma.o"
    proc = subprocess.run([NVCC, "-O3", "-std=c++17", "-arch=sm_80", "-c", str(cuda.SOURCE), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr


@needs_nvcc
def test_ptx_holds_binary_mma(tmp_path):
    out = tmp_path / "abq_bmma.ptx"
    proc = subprocess.run([NVCC, "-arch=sm_90", "-ptx", str(cuda.SOURCE), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc" in out.read_text()


@needs_nvcc
def test_shared_library_builds_for_sm90_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("ABQLLM_CACHE", str(tmp_path))
    path = cuda.build("90")
    assert path.exists() and cuda.build("90") == path  # second call: cached
    lib = ctypes.CDLL(str(path))  # loads without a GPU (cudart is linked statically)
    for name in ("abq_act_quant_pack", "abq_repack_bitplanes", "abq_bmma_linear", "abq_error_string"):
        assert hasattr(lib, name)
    lib.abq_error_string.restype = ctypes.c_char_p
    lib.abq_error_string.argtypes = [ctypes.c_int]
    assert lib.abq_error_string(0) == b"no error"


def test_cuda_kernel_not_selected_without_gpu():
    from abqllm.kernels import registry
    from abqllm.nn import QuantLinear
    from abqllm.spec import ActSpec, LayerSpec, WeightSpec

    layer = QuantLinear(64, 16, LayerSpec(WeightSpec(2), ActSpec(8)), kernel="cuda")
    assert not cuda.supports(layer, torch.device("cpu"))
    assert registry.select("linear", "auto", layer, torch.device("cpu")).name != "cuda"


# ---- numpy emulation of bmma_linear_kernel (abq_bmma.cu), one warp at a time ---------------------

def _popc(words: np.ndarray) -> np.ndarray:
    return np.array([bin(int(w) & 0xFFFFFFFF).count("1") for w in words.ravel()]).reshape(words.shape)


def _mma_b1_and_popc(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """acc [32 lanes, 2] += m8n8k128 AND+popc; a, b [32] uint32 per lane (PTX fragment layout:
    A row = lane / 4 and B column = lane / 4, k word = lane % 4; D row = lane / 4, cols 2 * (lane % 4) + t)."""
    A = a.reshape(8, 4)  # [row, k word]
    B = b.reshape(8, 4)  # [col, k word]
    D = np.array([[_popc(A[r] & B[c]).sum() for c in range(8)] for r in range(8)])
    for lane in range(32):
        acc[lane] += D[lane >> 2, 2 * (lane & 3): 2 * (lane & 3) + 2]


def emulate_bmma_linear(xp, xsum, sx, zx, M, q, wp, wsum, sw, zw, N, K, p, gs_words, G, warps_per_block=4):
    KW = xp.shape[-1]
    qp_log2 = 0 if q <= 1 else 1 if q <= 2 else 2 if q <= 4 else 3
    qp, tpt = 1 << qp_log2, 8 >> qp_log2
    y = np.full((M, N), np.nan, dtype=np.float32)
    lanes = np.arange(32)
    row, tig = lanes >> 2, lanes & 3
    for by in range(-(-M // tpt)):
        for warp_global in range(-(-N // (8 * warps_per_block)) * warps_per_block):
            n0 = warp_global * 8
            if n0 >= N:
                continue
            m = by * tpt + (row >> qp_log2)
            i = row & (qp - 1)
            a_ok = (m < M) & (i < q)
            nb = n0 + row
            b_ok = nb < N
            wpg = gs_words if gs_words else KW
            owner = (i == 0) & (m < M)
            accf = np.zeros((32, 2), np.float32)
            for g in range(G):
                acc = np.zeros((p, 32, 2), np.int64)
                w_lo, w_hi = g * wpg, min(KW, g * wpg + wpg)
                for c in range(w_lo, w_hi, 4):
                    wi = c + tig
                    inn = wi < w_hi
                    a = np.array([xp[i[l], m[l], wi[l]] if a_ok[l] and inn[l] else 0 for l in lanes], np.uint32)
                    for j in range(p):
                        b = np.array([wp[j, nb[l], wi[l]] if b_ok[l] and inn[l] else 0 for l in lanes], np.uint32)
                        _mma_b1_and_popc(acc[j], a, b)
                v = sum(acc[j] << j for j in range(p)) << i[:, None]
                off = 1
                while off < qp:  # __shfl_xor_sync(v, off * 4)
                    v = v + v[lanes ^ (off * 4)]
                    off <<= 1
                for lane in lanes[owner]:
                    kg = min(K, (g + 1) * gs_words * 32) - g * gs_words * 32 if gs_words else K
                    for t in range(2):
                        n = n0 + tig[lane] * 2 + t
                        if n < N:
                            z = int(zw[n, g])
                            tot = int(v[lane, t]) - int(zx[m[lane]]) * int(wsum[n, g]) - z * int(xsum[m[lane], g]) \
                                + kg * int(zx[m[lane]]) * z
                            accf[lane, t] += np.float32(tot) * np.float32(sw[n, g])
            for lane in lanes[owner]:
                for t in range(2):
                    n = n0 + tig[lane] * 2 + t
                    if n < N:
                        y[m[lane], n] = accf[lane, t] * np.float32(sx[m[lane]])
    return y


@pytest.mark.parametrize("p,q,gs,m,n,k", [(2, 8, 0, 1, 12, 200), (3, 4, 128, 3, 20, 300), (8, 8, 32, 2, 9, 100),
                                          (1, 2, 0, 5, 8, 64), (5, 3, 64, 4, 17, 130), (4, 6, 0, 3, 10, 96)])
def test_warp_algorithm_emulation_matches_reference(p, q, gs, m, n, k):
    g = torch.Generator().manual_seed(p * 10 + q)
    xc = torch.randint(0, 2 ** q, (m, k), generator=g)
    wc = torch.randint(0, 2 ** p, (n, k), generator=g)
    G = 1 if gs == 0 else -(-k // gs)
    sx, zx = torch.rand(m, generator=g) + 0.1, torch.randint(0, 2 ** q, (m,), generator=g).float()
    sw = (torch.rand(n, G, generator=g) + 0.1).half()
    zw = torch.randint(0, 2 ** p, (n, G), generator=g).to(torch.uint8)
    xp = pack_bitplanes(xc.to(torch.uint8), q).numpy().view(np.uint32)
    wp = pack_bitplanes(wc.to(torch.uint8), p).numpy().view(np.uint32)

    def group_sums(c):
        pad = G * (gs or k) - k
        return torch.nn.functional.pad(c, (0, pad)).reshape(c.shape[0], G, -1).sum(-1).numpy()

    y = emulate_bmma_linear(xp, group_sums(xc), sx.numpy(), zx.numpy(), m, q, wp, group_sums(wc), sw.float().numpy(),
                            zw.numpy(), n, k, p, gs // 32, G)
    ref = zero_point_epilogue(integer_dot(xc, wc, gs), xc, sx.view(-1, 1), zx.view(-1, 1), wc, sw, zw.float(), gs)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5 * ref.abs().max().item())
