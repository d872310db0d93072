"""Measured dispatch tables: derived from a suite run's rows (hand-made here, not measurements), looked up by scheme
class and rows, and taken by `auto` on the GPU they name (the device is faked: no GPU runs here)."""
import json

import pytest
import torch

from abqllm.kernels import dispatch_table as DT
from abqllm.kernels import registry
from abqllm.spec import parse_scheme
from benchmarks.gpu import derive_dispatch as DD
from benchmarks.gpu import llama

SHAPES = [(8192, 8192), (4096, 4096)]


def _rows(kernel, scheme, m, us_by_shape):
    return [dict(kernel=kernel, scheme=scheme, m=m, n=n, k=k, us=us) for (n, k), us in zip(SHAPES, us_by_shape)]


def _results():
    rows = []
    rows += _rows("torch float16", "W16A16", 1, [40, 12])
    rows += _rows("triton", "W4A16", 1, [20, 8]) + _rows("cuda-gemv", "W4A16", 1, [14, 6])  # cuda-gemv wins
    rows += _rows("triton", "W4A16", 2048, [300, 90]) + _rows("triton-dense", "W4A16", 2048, [295, 89])  # < 3%
    rows += _rows("triton", "W8A8", 4, [50, 15]) + [dict(kernel="cuda-gemv", scheme="W8A8", m=4, n=8192, k=8192,
                                                         us=10)]  # one shape only: not a candidate
    rows += _rows("triton", "W2*A8", 1, [30, 9]) + _rows("triton", "W3A8", 1, [30, 9])
    rows += _rows("cuda-gemv", "W2*A8", 1, [15, 5]) + _rows("cuda-gemv", "W3A8", 1, [16, 5])
    rows += _rows("triton", "W8A8 pc", 2048, [200, 60]) + _rows("triton-dense", "W8A8 pc", 2048, [120, 40])
    return dict(env=dict(gpu="NVIDIA H100 80GB HBM3", date="(hand-made)"),
                steps=[dict(sections=["ceilings", "kernels"], group_size=128)], kernels=dict(rows=rows))


def _rule(table, bits, act, pc, m):
    return next(r for r in table["rules"] if (r["storage_bits"], r["act_bits"], r["per_channel"], r["m_max"])
                == (bits, act, pc, m))


def test_derive_picks_the_fastest_kernel_over_every_shape():
    table, md = DD.derive(_results(), source="hand-made")
    assert table["device"] == "NVIDIA H100 80GB HBM3"
    assert _rule(table, 4, 16, False, 1)["kernel"] == "cuda-gemv"
    assert _rule(table, 4, 16, False, 2048)["kernel"] == "triton"  # 1-2% faster is noise: the default stays
    assert _rule(table, 8, 8, False, 4)["kernel"] == "triton"  # cuda-gemv was timed on one shape of two
    w3 = _rule(table, 3, 8, False, 1)  # W2* and W3 share 3-bit storage: one class, four samples
    assert w3["kernel"] == "cuda-gemv" and len(w3["evidence"]["samples"]) == 4
    assert _rule(table, 8, 8, True, 2048)["kernel"] == "triton-dense"
    assert any("| W4A16 | 1 | cuda-gemv |" in line for line in md)


def test_lookup_takes_the_first_rule_that_covers_the_rows():
    table, _ = DD.derive(_results())
    table["rules"].append(dict(storage_bits=4, act_bits=16, per_channel=False, m_max=16, kernel="triton-kpacked"))
    rules = DT.parse(table)
    assert DT.lookup(rules, (4, 16, False), 1) == "cuda-gemv"
    assert DT.lookup(rules, (4, 16, False), 2) == "triton-kpacked"
    assert DT.lookup(rules, (4, 16, False), 16) == "triton-kpacked"
    assert DT.lookup(rules, (4, 16, False), 17) == "triton"
    assert DT.lookup(rules, (4, 16, False), 100000) == "triton"  # above the last rule: the last rule
    assert DT.lookup(rules, (5, 16, False), 1) is None  # a class the run did not measure
    with pytest.raises(ValueError, match="m_max"):
        DT.parse(dict(rules=[dict(storage_bits=4, act_bits=16, per_channel=False, m_max=0, kernel="x")]))


@pytest.fixture
def fake_h100(tmp_path, monkeypatch):
    table, _ = DD.derive(_results())
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("ABQLLM_DISPATCH_TABLE", str(path))
    DT.reset()
    yield
    DT.reset()


def test_choose_reads_the_table_for_the_device(fake_h100, monkeypatch):
    layer = llama.random_quant_linear(256, 64, parse_scheme("W4A16g128").layer, "cpu")
    assert DT.choose(layer, torch.device("cuda", 0), 1) == "cuda-gemv"
    assert DT.choose(layer, torch.device("cuda", 0), 2048) == "triton"
    assert DT.choose(layer, torch.device("cpu"), 1) is None  # tables are for GPUs
    w6 = llama.random_quant_linear(256, 64, parse_scheme("W6A16g128").layer, "cpu")
    assert DT.choose(w6, torch.device("cuda", 0), 1) is None
    monkeypatch.setenv("ABQLLM_DISPATCH_TABLE", "off")
    DT.reset()
    assert DT.choose(layer, torch.device("cuda", 0), 1) is None


def test_auto_takes_the_measured_kernel_when_it_serves_the_layer(fake_h100, monkeypatch):
    layer = llama.random_quant_linear(256, 64, parse_scheme("W8A8").layer, "cpu")  # per channel, A8
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(DT, "choose", lambda layer, device, rows: "triton-kpacked" if rows > 1 else "no-such-kernel")
    assert registry.select("linear", "auto", layer, cuda, rows=64).name == "triton-kpacked"
    assert registry.select("linear", "auto", layer, cuda, rows=1).name == "triton"  # unknown name: priority order
    assert registry.select("linear", "auto", layer, cuda).name == "triton"  # rows unknown: priority order
    assert registry.select("linear", "triton", layer, cuda, rows=64).name == "triton"  # a named choice stays


def test_no_table_is_shipped_without_a_measurement():
    """Every shipped table names the suite run it came from, and that run's results are in the repository."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    for f in DT.TABLES.glob("*.json"):
        table = json.loads(f.read_text())
        assert (root / table["source"]).exists(), f"{f.name}: its source {table['source']} is not committed"
        assert table["rules"]


def test_a_damaged_table_is_refused_with_the_fix(tmp_path, monkeypatch):
    from abqllm.errors import AbqError
    bad = tmp_path / "bad.json"
    bad.write_text('{"device": "NVIDIA H100 80GB HBM3", "rules": [{"storage_bits": 4}]')  # cut short
    monkeypatch.setenv("ABQLLM_DISPATCH_TABLE", str(bad))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    DT.reset()
    layer = llama.random_quant_linear(256, 64, parse_scheme("W4A16g128").layer, "cpu")
    try:
        with pytest.raises(AbqError, match="bad.json.*ABQLLM_DISPATCH_TABLE=off"):
            DT.choose(layer, torch.device("cuda", 0), 1)
        bad.write_text('{"device": "x", "rules": [{"storage_bits": 4}]}')  # a rule without its fields
        DT.reset()
        with pytest.raises(AbqError, match="KeyError"):
            DT.choose(layer, torch.device("cuda", 0), 1)
    finally:
        DT.reset()


def test_a_layer_holding_only_kpacked_weights_on_the_device_gets_kpacked_kernels():
    """After keep_only_kpacked / settle_layouts the bitstream (qweight) lives in CPU memory and the k-packed layout on
    the GPU: `auto` then chooses among kernels that read the k-packed layout, and naming a bitstream kernel says
    why it cannot serve (instead of launching a GPU kernel on a CPU tensor)."""
    from abqllm.errors import AbqError
    from abqllm.kernels import kpacked_linear as KL
    layer = llama.random_quant_linear(256, 64, parse_scheme("W4A16g128").layer, "cpu")
    cuda = torch.device("cuda", 0)
    assert registry.select("linear", "auto", layer, cuda).name == "triton"  # no k-packed copy yet: as before
    KL.layer_kpacked(layer)  # (on the GPU this copy would be there, the qweight moved to CPU memory)
    assert registry.bitstream_elsewhere(layer, cuda) and not registry.bitstream_elsewhere(layer, torch.device("cpu"))
    assert registry.select("linear", "auto", layer, cuda).name == "triton-kpacked"
    assert "triton" not in registry.supporting("linear", layer, cuda)
    with pytest.raises(AbqError, match="checkpoint layout.*k-packed"):
        registry.select("linear", "triton", layer, cuda)
    assert {registry.layout("linear", n) for n in ("triton-kpacked", "triton-dense", "cuda-gemv")} == {"kpacked"}


def _table_with(tmp_path, monkeypatch, rules):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(dict(device="NVIDIA H100 80GB HBM3", rules=rules)))
    monkeypatch.setenv("ABQLLM_DISPATCH_TABLE", str(path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    DT.reset()


@pytest.mark.parametrize("kernels, needed", [
    ((("triton", 1), ("cuda-gemv", 4), ("triton-kpacked", 16), ("triton-dense", 2048)), False),
    ((("cuda-gemv", 4), ("triton-dense", 2048)), False),
    ((("triton", 1), ("triton", 16), ("triton-dense", 2048)), True),  # qlinear_kernel at 2..16 rows
    ((("cuda-gemv", 1), ("cuda", 64), ("triton-dense", 2048)), True),  # bit planes are built from qweight
    ((("cuda-gemv", 1), ("some-future-kernel", 2048)), True),
])
def test_bitstream_is_dropped_only_when_every_row_count_reads_kpacked(tmp_path, monkeypatch, kernels, needed):
    rules = [dict(storage_bits=4, act_bits=16, per_channel=False, m_max=m, kernel=k) for k, m in kernels]
    _table_with(tmp_path, monkeypatch, rules)
    try:
        w4 = llama.random_quant_linear(256, 64, parse_scheme("W4A16g128").layer, "cpu")
        w3 = llama.random_quant_linear(256, 64, parse_scheme("W3A16g128").layer, "cpu")
        assert DT.bitstream_needed(w4, torch.device("cuda", 0)) is needed
        assert DT.bitstream_needed(w3, torch.device("cuda", 0))  # a class the table does not cover
        assert DT.bitstream_needed(w4, torch.device("cpu"))
    finally:
        DT.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_settle_holds_weights_once_and_still_computes_the_layer(tmp_path, monkeypatch):
    from abqllm.kernels import kpacked_linear as KL
    from abqllm.kernels.reference import linear_reference
    name = torch.cuda.get_device_name()
    rules = [dict(storage_bits=4, act_bits=16, per_channel=False, m_max=1, kernel="triton"),
             dict(storage_bits=4, act_bits=16, per_channel=False, m_max=2048, kernel="triton-kpacked")]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(dict(device=name, rules=rules)))
    monkeypatch.setenv("ABQLLM_DISPATCH_TABLE", str(path))
    DT.reset()
    try:
        layer = llama.random_quant_linear(4096, 1024, parse_scheme("W4A16g128").layer, "cpu")
        layer.kernel = "auto"
        x = torch.randn(5, 4096).half()
        ref = linear_reference(layer, x.double())
        model = torch.nn.Sequential(layer).cuda()
        before = torch.cuda.memory_allocated()
        freed = KL.settle_layouts(model)
        assert freed == 1024 * 4096 // 2 and not model[0].qweight.is_cuda
        assert torch.cuda.memory_allocated() < before
        for rows in (1, 5):
            y = model(x[:rows].cuda()).double().cpu()
            err = (y - ref[:rows]).abs().max() / ref[:rows].abs().max()
            assert err < 1e-2, f"{rows} rows: relative error {err}"
    finally:
        DT.reset()
