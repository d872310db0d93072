"""lm-eval tasks through `abq eval --tasks`: the local tasks' documents, the CLI on a tiny random Llama
(float and quantized), and the one-line errors. Skips what needs lm-eval when it is not installed."""
import json
import sys

import pytest

from abqllm.cli import main
from abqllm.errors import AbqError
from abqllm.eval import tasks as local
from tests.tiny import make_tiny_llama

ARTICLES = """ = Lighthouses = 

 A lighthouse is a tower that carries a lamp to guide ships at night. The keeper of the lighthouse climbed the stairs every evening to light the lamp, and every morning he cleaned the glass around the lamp. Sailors far out at sea trusted the light of the lamp.

 = = History = = 

 The oldest towers were built of stone by the sea. Fires burned at their tops through the winter. Later towers used oil lamps and large lenses that threw the beam far across the water. Many of these towers still stand today. Some are now museums for visitors. Others still guide ships along the coast.

 = Rivers = 

 A river carries water from the hills down to the sea, and along the way the river shapes the land. Towns grew beside the river because the river gave them water, fish and a road for boats on the river.

 Floods came every spring when the snow melted in the hills. Farmers learned to build their houses on higher ground. The mud left behind made the fields rich. Bridges were built where the river was narrow. Mills used the current to grind grain. Boats carried goods from town to town.
"""


def _run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ---- local task documents (no lm-eval needed) -----------------------------------------------------

def test_lastword_documents():
    docs = local.lastword_docs(ARTICLES)
    assert docs, "the sample text has LAMBADA-style passages"
    for d in docs:
        words = d["context"].split()
        assert 30 - 1 <= len(words) <= 150 and d["target"].isalpha()
        assert d["target"].lower() in {w.strip(".,;:\"'()").lower() for w in words}  # predictable from context
        assert d["article"] in ("Lighthouses", "Rivers")


def test_nextsent_documents():
    docs = local.nextsent_docs(ARTICLES)
    assert docs
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4 and 0 <= d["label"] < 4
        true = d["choices"][d["label"]]
        paragraph = next(p for _, ps in local.articles(ARTICLES) for p in ps if p.startswith(d["context"]))
        assert paragraph[len(d["context"]):].strip().startswith(true)  # the sentence that really follows
        others = [c for i, c in enumerate(d["choices"]) if i != d["label"]]
        assert all(c not in paragraph for c in others)  # distractors come from other paragraphs


def test_data_file_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("ABQLLM_CACHE", str(tmp_path / "a"))
    a = local.data_file("abq_nextsent", ARTICLES)
    monkeypatch.setenv("ABQLLM_CACHE", str(tmp_path / "b"))
    b = local.data_file("abq_nextsent", ARTICLES)
    assert a != b and a.read_bytes() == b.read_bytes() and a.name == b.name
    assert [json.loads(line) for line in a.read_text().splitlines()] == local.nextsent_docs(ARTICLES)
    with pytest.raises(AbqError, match="no local task"):
        local.data_file("hellaswag", ARTICLES)


def test_missing_lm_eval_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    code, _, err = _run(capsys, "eval", "--model", str(tmp_path), "--tasks", "abq_lastword")
    assert code == 2 and "pip install" in err and len(err.strip().splitlines()) == 1


# ---- through lm-eval ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def harness():
    pytest.importorskip("lm_eval")
    from abqllm.eval import harness

    return harness


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from abqllm.data.sources import load_text

    try:
        load_text(None)  # the local tasks are built from the default evaluation text
    except AbqError as e:
        pytest.skip(f"default Wikipedia text unavailable: {e}")
    root = tmp_path_factory.mktemp("harness")
    model, tok = make_tiny_llama()
    # The tiny byte-level tokenizer makes ~1 token per character: room for whole passages.
    model.config.max_position_embeddings = 4096
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    assert main(["quantize", "--model", str(root / "model"), "--wbits", "4", "--abits", "8",
                 "--out", str(root / "w4a8")]) == 0
    return root


@pytest.mark.parametrize("model", ["model", "w4a8"])
def test_eval_tasks_tiny(harness, tiny, capsys, model):
    out = tiny / f"{model}.json"
    code, stdout, err = _run(capsys, "eval", "--model", str(tiny / model), "--tasks", "abq_lastword,abq_nextsent",
                             "--limit", "3", "--json", str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["n_samples"] == {"abq_lastword": 3, "abq_nextsent": 3}
    assert 0 <= r["results"]["abq_lastword"]["acc"] <= 1 and r["results"]["abq_lastword"]["perplexity"] > 1
    assert {"acc", "acc_norm", "acc_stderr"} <= set(r["results"]["abq_nextsent"])
    assert (r["scheme"] == "float") == (model == "model") and "abq_nextsent" in stdout
    if model == "w4a8":
        assert r["scheme"]["weight"]["bits"] == 4 and r["method"] == "rtn"


def test_unknown_task_names(harness):
    manager = harness.task_manager(["abq_lastword"])  # local tasks only: no lm-eval index to build
    with pytest.raises(AbqError, match=r"unknown lm-eval tasks nope, nada; `abq eval --model M --tasks list`"):
        harness.resolve_tasks(["abq_lastword", "nope", "nada"], manager)
    assert harness.resolve_tasks(["abq_*"], manager) == ["abq_lastword", "abq_nextsent"]


@pytest.mark.slow
def test_unknown_task_via_cli(harness, tiny, capsys):
    """Indexes all of lm-eval's tasks (10-30 s), then refuses the name in one line before loading the model."""
    code, _, err = _run(capsys, "eval", "--model", str(tiny / "model"), "--tasks", "abq_lastword,hellaswagg")
    assert code == 2 and "unknown lm-eval task hellaswagg" in err and len(err.strip().splitlines()) == 1


@pytest.mark.realmodel
@pytest.mark.slow
def test_lastword_separates_float_from_broken(harness, default_model_dir):
    """On the default model, the float model predicts last words better than RTN W2*A16 (perplexity ~1e6)."""
    import abqllm

    model, tok = abqllm.load_model("smollm2-135m")
    fp = harness.run_tasks(model, tok, ["abq_lastword"], limit=40)["results"]["abq_lastword"]
    abqllm.quantize(model, "W2*A16", method="rtn", progress=False)
    q = harness.run_tasks(model, tok, ["abq_lastword"], limit=40)["results"]["abq_lastword"]
    assert fp["acc"] > q["acc"] and fp["perplexity"] < q["perplexity"] / 10
