"""The CLI end to end on a tiny random Llama, and every bad input it must refuse in one line."""
import json
import subprocess
import sys

import pytest

from abqllm.cli import main
from tests.tiny import TEXT, make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_tiny_llama(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


def _run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_quantize_eval_generate(tiny, capsys):
    out = tiny / "w4a8"
    code, stdout, err = _run(capsys, "quantize", "--model", str(tiny / "model"), "--wbits", "4", "--abits", "8",
                             "--method", "rtn", "--out", str(out), "--json", str(tiny / "q.json"))
    assert code == 0, err
    assert (out / "model.safetensors").exists() and json.loads((tiny / "q.json").read_text())["layers"] == 14
    code, stdout, err = _run(capsys, "eval", "--model", str(out), "--data", str(tiny / "text.txt"),
                             "--window", "64", "--json", str(out / "eval.json"))
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    assert {"ppl", "tokens", "window", "data"} <= set(result) and result["window"] == 64 and result["ppl"] > 1
    code, stdout, err = _run(capsys, "eval", "--model", str(tiny / "model"), "--data", str(tiny / "text.txt"),
                             "--window", "64", "--json", str(tiny / "fp.json"))
    assert code == 0 and json.loads((tiny / "fp.json").read_text())["tokens"] == result["tokens"]
    code, stdout, err = _run(capsys, "generate", "--model", str(out), "--prompt", "The capital",
                             "--max-new-tokens", "5")
    assert code == 0 and stdout.startswith("The capital")


def test_balanced_and_groups(tiny, capsys):
    code, _, err = _run(capsys, "quantize", "--model", str(tiny / "model"), "--wbits", "2", "--balanced",
                        "--group-size", "32", "--out", str(tiny / "w2s"))
    assert code == 0, err
    cfg = json.loads((tiny / "w2s" / "config.json").read_text())["quantization_config"]
    assert cfg["spec"]["weight"] == {"bits": 2, "balanced": True, "group_size": 32, "symmetric": True}


def test_online_hadamard(tiny, capsys):
    out = tiny / "had"
    code, _, err = _run(capsys, "quantize", "--model", str(tiny / "model"), "--wbits", "4", "--abits", "4",
                        "--rotate", "--hadamard", "64", "--hadamard-layers", "all", "--out", str(out))
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["spec"]["hadamard"] == 64 and cfg["spec"]["rotate"] is True
    assert cfg["layers"]["model.layers.0.mlp.down_proj"]["hadamard"] == 32  # 160 columns: blocks of 32
    assert cfg["layers"]["model.layers.0.mlp.up_proj"]["hadamard"] == 64 and cfg["spec"]["hadamard_layers"] == "all"
    code, stdout, err = _run(capsys, "generate", "--model", str(out), "--prompt", "The capital",
                             "--max-new-tokens", "5")
    assert code == 0 and stdout.startswith("The capital"), err


BAD = [
    (["--wbits", "4", "--abits", "4", "--hadamard", "100"], "--hadamard"),
    (["--wbits", "4", "--hadamard", "x"], "--hadamard"),
    (["--wbits", "0"], "weight bits"),
    (["--wbits", "9"], "weight bits"),
    (["--wbits", "x"], "weight bits"),
    (["--wbits", "4", "--abits", "1"], "activation bits"),
    (["--wbits", "4", "--group-size", "0x"], "group size"),
    (["--wbits", "4", "--group-size", "-64"], "group size"),
    (["--wbits", "4", "--method", "magic"], "unknown method"),
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_quantize_args(tiny, capsys, args, msg):
    out = tiny / "bad"
    code, stdout, err = _run(capsys, "quantize", "--model", str(tiny / "model"), *args, "--out", str(out))
    assert code != 0 and msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_models(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                               "model_type": "gpt2"}))
    for model, msg in [(str(tmp_path / "nope"), "does not exist"), (str(tmp_path / "empty"), "not a model"),
                       (str(tmp_path / "gpt2"), "not supported")]:
        code, _, err = _run(capsys, "eval", "--model", model, "--data", str(tiny / "text.txt"))
        assert code != 0 and msg in err and len(err.strip().splitlines()) == 1, err


def test_existing_output_refused_before_work(tiny, capsys):
    (tiny / "exists").mkdir(exist_ok=True)
    code, _, err = _run(capsys, "quantize", "--model", str(tiny / "nonexistent-model"), "--wbits", "4",
                        "--out", str(tiny / "exists"))
    assert code != 0 and "already exists" in err and "--overwrite" in err


def test_text_too_short(tiny, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    code, _, err = _run(capsys, "eval", "--model", str(tiny / "model"), "--data", str(short))
    assert code != 0 and "fewer than one window" in err


def test_missing_data_file(tiny, capsys):
    code, _, err = _run(capsys, "eval", "--model", str(tiny / "model"), "--data", str(tiny / "missing.txt"))
    assert code != 0 and "missing.txt" in err


def test_damaged_checkpoint_via_cli(tiny, capsys):
    out = tiny / "dmg"
    assert _run(capsys, "quantize", "--model", str(tiny / "model"), "--wbits", "4", "--out", str(out))[0] == 0
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    code, _, err = _run(capsys, "generate", "--model", str(out), "--prompt", "x")
    assert code != 0 and "truncated" in err and len(err.strip().splitlines()) == 1


def test_entry_point_exit_code(tiny):
    r = subprocess.run([sys.executable, "-m", "abqllm.cli", "quantize", "--model", str(tiny / "model"),
                        "--wbits", "9", "--out", str(tiny / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: weight bits") and "Traceback" not in r.stderr


def test_tune_a_checkpoint_and_quantize_with_e2e(tiny, capsys):
    src = tiny / "w2-for-tune"
    code, _, err = _run(capsys, "quantize", "--model", str(tiny / "model"), "--wbits", "2", "--group-size", "32",
                        "--out", str(src))
    assert code == 0, err
    out = tiny / "w2-tuned"
    code, stdout, err = _run(capsys, "tune", "--model", str(src), "--teacher", str(tiny / "model"),
                             "--data", str(tiny / "text.txt"), "--calib-samples", "8", "--calib-seqlen", "32",
                             "--lr", "1e-2", "--epochs", "2", "--out", str(out), "--json", str(tiny / "t.json"))
    assert code == 0, err
    report = json.loads((tiny / "t.json").read_text())
    assert report["kl_after"] <= report["kl_before"] and "held-out KL" in stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["e2e_tuning"]["calib_shape"] == [8, 32] and qc["method"] == "rtn"
    code, stdout, err = _run(capsys, "eval", "--model", str(out), "--data", str(tiny / "text.txt"), "--window", "64")
    assert code == 0, err
    # one command: calibrate, then tune
    code, stdout, err = _run(capsys, "quantize", "--model", str(tiny / "model"), "--wbits", "3", "--method", "gptq",
                             "--data", str(tiny / "text.txt"), "--calib-samples", "8", "--calib-seqlen", "32",
                             "--e2e-epochs", "1", "--out", str(tiny / "w3-e2e"), "--json", str(tiny / "q3.json"))
    assert code == 0, err
    assert json.loads((tiny / "q3.json").read_text())["e2e_tuning"]["settings"]["epochs"] == 1
    qc = json.loads((tiny / "w3-e2e" / "config.json").read_text())["quantization_config"]
    assert qc["e2e_tuning"]["data"] and qc["method"] == "gptq"


@pytest.mark.parametrize("argv,message", [
    (["--model", "{model}", "--teacher", "{model}"], "not an abqllm checkpoint"),
    (["--model", "{ckpt}", "--teacher", "{ckpt}"], "is quantized"),
    (["--model", "{ckpt}", "--teacher", "{model}", "--epochs", "0"], "epochs"),
    (["--model", "{ckpt}", "--teacher", "{model}", "--holdout", "1.5"], "holdout"),
])
def test_tune_refusals(tiny, capsys, argv, message):
    ckpt = tiny / "w4-for-refusals"
    if not ckpt.exists():
        assert _run(capsys, "quantize", "--model", str(tiny / "model"), "--wbits", "4", "--out", str(ckpt))[0] == 0
    argv = [a.format(model=tiny / "model", ckpt=ckpt) for a in argv]
    out = tiny / "refused"
    code, _, err = _run(capsys, "tune", *argv, "--data", str(tiny / "text.txt"), "--out", str(out))
    last = err.strip().splitlines()[-1]  # (transformers' loading bar may come before)
    assert code == 2 and last.startswith("error:") and message in last and "Traceback" not in err
    assert not out.exists()
