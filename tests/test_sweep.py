"""`abq sweep` on a tiny random Llama: files written, measured bits per weight, cached cells reused,
bad configurations refused in one line, and the abq method end to end."""
import json
import math

import pytest

from abqllm.cli import main
from abqllm.sweep import safetensors_bytes
from tests.tiny import TEXT, make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    make_tiny_llama(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


def _sweep(capsys, tiny, out, *extra):
    code = main(["sweep", "--model", str(tiny / "model"), "--data", str(tiny / "text.txt"), "--window", "64",
                 "--max-windows", "2", "--out", str(out), *extra])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _expected_bits(wbits: int, shapes: list[tuple[int, int]]) -> float:
    """Packed codes (K padded to 32) + one fp16 scale and one uint8 zero point per output channel."""
    stored = sum(n * math.ceil(k / 32) * wbits * 4 + n * 2 + n for n, k in shapes)
    return stored * 8 / sum(n * k for n, k in shapes)


def test_sweep_writes_table_and_plot_then_reuses_cells(tiny, capsys):
    pytest.importorskip("matplotlib")
    out = tiny / "rtn"
    code, stdout, err = _sweep(capsys, tiny, out, "--configs", "W4A16,W8A8", "--method", "rtn")
    assert code == 0, err
    assert stdout.count("quantizing with rtn") == 2
    for name in ("sweep.csv", "sweep.json", "sweep.md", "sweep.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "cells").glob("*.json"))) == 3 and not (out / "work").exists()
    rows = {r["config"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert set(rows) == {"float", "W4A16", "W8A8"} and rows["float"]["bits_per_weight"] == 32
    model_shapes = [(160, 64), (64, 160), (160, 64)] + [(64, 64), (32, 64), (32, 64), (64, 64)]  # mlp + attention
    shapes = model_shapes * 2  # two blocks
    assert rows["W4A16"]["bits_per_weight"] == pytest.approx(_expected_bits(4, shapes))
    assert rows["W8A8"]["bits_per_weight"] == pytest.approx(_expected_bits(8, shapes))
    assert rows["W4A16"]["size_mb"] < rows["W8A8"]["size_mb"] < rows["float"]["size_mb"]
    assert rows["W8A8"]["ratio"] == pytest.approx(rows["W8A8"]["ppl"] / rows["float"]["ppl"])
    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("config,method,bits_per_weight") and len(csv_lines) == 4
    assert "| W8A8 |" in (out / "sweep.md").read_text()
    cells = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}

    # Same settings: nothing is quantized or evaluated again.
    code, stdout, _ = _sweep(capsys, tiny, out, "--configs", "W4A16,W8A8", "--method", "rtn")
    assert code == 0 and stdout.count(": cached") == 3 and "quantizing" not in stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == cells
    # A cell made by another version of the method's code is still used, with a warning.
    w8 = next((out / "cells").glob("rtn-W8A8-*.json"))
    w8.write_text(w8.read_text().replace(json.loads(w8.read_text())["method_source"]["sha256"], "0" * 64))
    code, stdout, _ = _sweep(capsys, tiny, out, "--configs", "W4A16,W8A8", "--method", "rtn")
    assert code == 0 and stdout.count(": cached") == 3 and "made with another version of abqllm/methods/rtn.py" in stdout
    # One more configuration: only it is computed; the table now has it too.
    code, stdout, _ = _sweep(capsys, tiny, out, "--configs", "W4A16,W8A8,W4A16g32", "--method", "rtn")
    assert code == 0 and stdout.count(": cached") == 3 and stdout.count("quantizing") == 1
    assert "W4A16g32" in (out / "sweep.csv").read_text()


def test_sweep_key_includes_evaluation_windows(tiny, capsys):
    pytest.importorskip("matplotlib")
    out = tiny / "windows"
    assert _sweep(capsys, tiny, out, "--configs", "W8A8", "--method", "rtn")[0] == 0
    code = main(["sweep", "--model", str(tiny / "model"), "--data", str(tiny / "text.txt"), "--window", "64",
                 "--max-windows", "3", "--out", str(out), "--configs", "W8A8", "--method", "rtn"])
    stdout = capsys.readouterr().out
    assert code == 0 and "cached" not in stdout and len(list((out / "cells").glob("*.json"))) == 4


@pytest.mark.parametrize("configs,msg", [("W4A16,W9A16", "weight bits"), ("W4A16,4bit", "cannot read scheme"),
                                         (",", "no configurations")])
def test_bad_configs_one_line(tiny, capsys, configs, msg):
    out = tiny / "bad"
    code, _, err = _sweep(capsys, tiny, out, "--configs", configs, "--method", "rtn")
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_bad_method_one_line(tiny, capsys):
    code, _, err = _sweep(capsys, tiny, tiny / "bad", "--configs", "W4A8", "--method", "magic")
    assert code == 2 and "unknown method" in err and len(err.strip().splitlines()) == 1


def test_sweep_with_abq(tiny, capsys):
    pytest.importorskip("matplotlib")
    out = tiny / "abq"
    code, stdout, err = _sweep(capsys, tiny, out, "--configs", "W4A8", "--method", "abq", "--calib-samples", "4",
                               "--calib-seqlen", "32", "--keep-checkpoints")
    assert code == 0, err
    cell = next(json.loads(p.read_text()) for p in (out / "cells").glob("abq-*.json"))
    assert cell["preset"] == "cpu" and cell["key"]["calib"] == {"samples": 4, "seqlen": 32, "seed": 0}
    assert cell["key"]["method_settings"]["epochs"] == 1 and math.isfinite(cell["ppl"])
    ckpt = out / "work" / cell["checkpoint"].rsplit("/", 1)[-1]
    assert (ckpt / "model.safetensors").exists() and (out / "work" / f"{ckpt.name}.calib").is_dir()
    sizes = safetensors_bytes(ckpt / "model.safetensors")
    assert sum(sizes.values()) <= (ckpt / "model.safetensors").stat().st_size
    # Another option is another cell.
    code, stdout, _ = _sweep(capsys, tiny, out, "--configs", "W4A8", "--method", "abq", "--calib-samples", "4",
                             "--calib-seqlen", "32", "--method-opt", "use_attn=false")
    assert code == 0 and "W4A8: cached" not in stdout and len(list((out / "cells").glob("abq-*.json"))) == 2
