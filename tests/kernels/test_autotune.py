"""`abq tune-kernels` (kernels/autotune.py): its mechanics on the CPU (the CPU kernels stand in for the GPU's: the
timings are real, the device is not the one tables are for), the saved table as `auto` reads it on a faked GPU, and
the command's refusals. On a GPU (marker `gpu`) it tunes a tiny checkpoint for real."""
import json

import pytest
import torch

from abqllm.cli import DEFAULT_TUNE_ROWS, main
from abqllm.kernels import autotune as AT
from abqllm.kernels import dispatch_table as DT
from abqllm.spec import parse_scheme
from benchmarks.gpu import llama
from tests.tiny import make_tiny_llama


def _layers():
    out = []
    for scheme, n, k in (("W4A16g64", 128, 256), ("W4A16g64", 64, 256), ("W8A8", 64, 128)):
        layer = llama.random_quant_linear(k, n, parse_scheme(scheme).layer, "cpu", seed=n)
        layer.kernel = "auto"
        out.append(layer)
    return out


def test_tune_times_every_candidate_and_derives_rules():
    table = AT.tune_layers(_layers(), torch.device("cpu"), rows=(1, 4), dtype=torch.float32, log=lambda m: None)
    assert table["device"] == "cpu" and table["default"] in ("cpu", "torch")
    kernels = {r["kernel"] for r in table["measurements"]}
    assert "torch" in kernels and not kernels & set(AT.EXCLUDED)
    assert all(r["us"] > 0 for r in table["measurements"])
    classes = {(r["storage_bits"], r["act_bits"], r["per_channel"], r["m_max"]) for r in table["rules"]}
    assert classes == {(4, 16, False, 1), (4, 16, False, 4), (8, 8, True, 1), (8, 8, True, 4)}
    w4 = next(r for r in table["rules"] if (r["storage_bits"], r["m_max"]) == (4, 1))
    assert len(w4["evidence"]["samples"]) == 2  # both W4A16 layers count for their class
    assert "W4A16" in AT.format_rules(table)


def test_distinct_layers_one_per_scheme_and_shape(tmp_path):
    model = torch.nn.Sequential(*_layers(), *_layers())
    assert len(AT.distinct_layers(model)) == 3


def test_saved_table_is_what_auto_reads_for_that_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("ABQLLM_CACHE", str(tmp_path))
    monkeypatch.delenv("ABQLLM_DISPATCH_TABLE", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA L4")
    rules = [dict(storage_bits=4, act_bits=16, per_channel=False, m_max=1, kernel="cuda-gemv", evidence={})]
    path = AT.save_table(dict(device="NVIDIA L4", rules=rules))
    assert path == tmp_path / "tables" / "nvidia-l4.json" and json.loads(path.read_text())["rules"] == rules
    assert not list(path.parent.glob("*.tmp-*"))
    layer = _layers()[0]
    try:
        assert DT.choose(layer, torch.device("cuda", 0), 1) == "cuda-gemv"
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100")
        DT.reset()
        assert DT.choose(layer, torch.device("cuda", 0), 1) is None  # another GPU model: no table
    finally:
        DT.reset()


def test_cli_rows_default_matches_the_module():
    assert tuple(DEFAULT_TUNE_ROWS) == AT.DEFAULT_ROWS


@pytest.mark.parametrize("argv, message", [
    (["--rows", "1,x"], "--rows takes positive integers"),
    (["--rows", "0,4"], "--rows takes positive integers"),
    (["--dtype", "int8"], "--dtype must be float16 or bfloat16"),
])
def test_cli_refuses_bad_arguments(tmp_path, capsys, argv, message):
    assert main(["tune-kernels", "--model", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_float_model_and_a_cpu(tmp_path, capsys):
    make_tiny_llama(tmp_path / "float")
    assert main(["tune-kernels", "--model", str(tmp_path / "float")]) == 2
    assert "not an abqllm checkpoint" in capsys.readouterr().err
    q = tmp_path / "w4"
    assert main(["quantize", "--model", str(tmp_path / "float"), "--wbits", "4", "--method", "rtn",
                 "--out", str(q)]) == 0
    capsys.readouterr()
    assert main(["tune-kernels", "--model", str(q), "--device", "cpu"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "tables").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tunes_a_checkpoint(tmp_path, capsys):
    make_tiny_llama(tmp_path / "float")
    q = tmp_path / "w4"
    assert main(["quantize", "--model", str(tmp_path / "float"), "--wbits", "4", "--method", "rtn",
                 "--out", str(q)]) == 0
    out = tmp_path / "table.json"
    assert main(["tune-kernels", "--model", str(q), "--rows", "1,16", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["device"] == torch.cuda.get_device_name() and table["rules"]
