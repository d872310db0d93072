"""`abq bench cpu` on a tiny random Llama (a smoke test of the harness and its JSON), its refusals, and the
llama.cpp side on the default model's GGUF when llama-cpp-python is installed."""
import json

import pytest

from abqllm.cli import main
from abqllm.runtime import bench
from tests.tiny import make_tiny_llama

ROW_FIELDS = {"runtime", "config", "prefill_tok_s", "decode_tok_s", "prefill_tok_s_runs", "decode_tok_s_runs",
              "peak_rss_mb", "base_rss_mb", "end_rss_mb", "first_tokens"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_tiny_llama(root / "model")
    return root


def test_bench_cpu_smoke(tiny, capsys):
    out = tiny / "bench.json"
    code = main(["bench", "cpu", "--model", str(tiny / "model"), "--configs", "float,W4A8+lm_head",
                 "--prompt-len", "12", "--new-tokens", "4", "--threads", "1", "--runs", "2", "--llama-cpp", "off",
                 "--work", str(tiny / "work"), "--json", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    result = json.loads(out.read_text())
    assert {"command", "model", "settings", "prompt_tokens", "new_tokens", "threads", "rows", "machine",
            "protocol"} <= set(result)
    assert result["prompt_tokens"] == 12 and result["llama_cpp"] == "off"
    assert "load_average" in result["machine"] and result["command"].startswith("abq bench cpu")
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"float", "W4A8+lm_head"}
    for r in rows.values():
        assert ROW_FIELDS <= set(r), r
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and len(r["decode_tok_s_runs"]) == 2
        assert r["peak_rss_mb"] >= r["base_rss_mb"] > 0 and r["torch_threads"] == 1
    assert rows["W4A8+lm_head"]["model_mb"] < rows["float"]["model_mb"]
    assert "| abqllm | W4A8+lm_head |" in cap.out
    # The checkpoint is reused by a second run (no quantize time).
    assert (tiny / "work" / "model" / "W4A8_lm_head" / "config.json").is_file()


def test_bench_cpu_rounds_interleave(tiny, capsys):
    out = tiny / "rounds.json"
    code = main(["bench", "cpu", "--model", str(tiny / "model"), "--configs", "float,W4A8", "--prompt-len", "8",
                 "--new-tokens", "3", "--threads", "1", "--runs", "1", "--rounds", "3", "--llama-cpp", "off",
                 "--work", str(tiny / "work"), "--json", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    # interleaved: round 1 of both configurations before round 2 of either
    order = [ln.split(":")[0] for ln in cap.out.splitlines() if ", round " in ln]
    assert order == ["float", "W4A8"] * 3, order
    result = json.loads(out.read_text())
    assert "3 interleaved rounds" in result["protocol"] and "--rounds 3" in result["command"]
    for r in result["rows"]:
        assert len(r["decode_tok_s_rounds"]) == 3 and r["rounds_ok"] == 3
        assert r["decode_tok_s"] == sorted(r["decode_tok_s_rounds"])[1]


@pytest.mark.parametrize("args,msg", [
    (["--rounds", "0"], "--rounds"),
    (["--configs", "W9A8"], "weight bits"),
    (["--configs", "W4A8x"], "cannot read scheme"),
    (["--threads", "0"], "--threads"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--engine", "turbo"], "--engine"),
    (["--gguf-formats", "Q9_9"], "GGUF format"),
    (["--gguf", "/nonexistent.gguf"], "not a file"),
])
def test_bench_bad_input(tiny, capsys, args, msg):
    code = main(["bench", "cpu", "--model", str(tiny / "model"), "--llama-cpp", "off", *args])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_prompt_ids_are_long_enough(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    assert len(bench.prompt_ids(tok, 700)) == 700


@pytest.mark.realmodel
def test_llama_cpp_worker_on_the_shipped_gguf(default_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from abqllm.models.hub import _smollm2_gguf

    gguf = _smollm2_gguf()
    assert bench._gguf_format(gguf) == "Q4_1"
    ids = bench.prompt_ids(AutoTokenizer.from_pretrained(default_model_dir), 16)
    res = bench._spawn("llama_cpp", {"ids": ids, "new_tokens": 4, "threads": 1, "runs": 1, "gguf": str(gguf)})
    assert "error" not in res, res
    assert res["decode_tok_s"] > 0 and len(res["first_tokens"]) == 4 and res["peak_rss_mb"] > res["base_rss_mb"]
    # The float model is this file dequantized: llama.cpp's first greedy token is ours.
    import abqllm
    from abqllm.runtime.cpu_decode import CpuDecoder

    model, _ = abqllm.load_model("smollm2-135m")
    ours = CpuDecoder(model, max_len=32).generate(ids, 4, ignore_eos=True).tokens
    assert res["first_tokens"][0] == ours[0], (res["first_tokens"], ours)
    dst = tmp_path / "q8.gguf"
    bench._quantize_gguf(gguf, dst, "Q8_0", threads=1)
    assert bench._gguf_format(dst) == "Q8_0"


@pytest.mark.parametrize("name,want", [("W4A8+had:512+head8", "W4A8+had:512+head:W8A8"),
                                       ("W4A4+rot+had:64+lm_head", "W4A4+rot+had:64"),
                                       ("W4A8+head8", "W4A8+head:W8A8")])
def test_config_names_keep_rotations(name, want):
    from abqllm.runtime.bench import config_spec
    spec = config_spec(name)
    assert spec.name == want
    assert spec.is_skipped("lm_head") == (not name.endswith("+lm_head"))
