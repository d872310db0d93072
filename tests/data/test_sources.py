"""abqllm.data: the default Wikipedia split, text files, hub-source errors and tokenization."""

import re
import subprocess
import sys
import types

import pytest
import torch

from abqllm.data import sources, wiki
from abqllm.data.sources import TextSplit, calibration_samples, eval_token_ids, load_text
from abqllm.errors import AbqError

PROSE = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Anarchism is a political philosophy that advocates self-governed societies.",
    "Albedo is the measure of the diffuse reflection of solar radiation.",
    "Alabama is a state in the southeastern region of the United States.",
    "Aristotle was a Greek philosopher and scientist born in Stagira.",
]


@pytest.fixture(scope="module")
def wiki_split():
    try:
        return load_text()
    except AbqError as e:  # no gensim wheel in the cache and no way to download it
        pytest.skip(f"default Wikipedia text unavailable: {e}")


@pytest.fixture(scope="module")
def wiki_eval_articles(wiki_split):
    arts = [a for a in wiki.load_articles() if len(a.text) >= sources.MIN_ARTICLE_CHARS]
    return [a for i, a in enumerate(arts) if i % 10 == 9]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer trained here: no hub, GPT-2-style pre-tokenization."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROSE * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64)


def _text_file(tmp_path, paragraphs=40):
    path = tmp_path / "corpus.txt"
    text = "\n\n".join(f" {PROSE[i % len(PROSE)]} Paragraph {i}." for i in range(paragraphs))
    path.write_text(text, encoding="utf-8")
    return path


# ---- default Wikipedia split ----------------------------------------------------------------------

def test_wiki_split_is_deterministic(wiki_split):
    wiki._load.cache_clear()  # re-read the JSON cache instead of reusing the objects in memory
    again = load_text("wiki")
    assert again == wiki_split
    assert wiki_split.name == "wiki-enwiki-gensim"
    assert "i % 10 == 9" in wiki_split.description


def test_wiki_split_parts_are_disjoint_and_about_ten_percent(wiki_split, wiki_eval_articles):
    assert len(wiki_eval_articles) >= 5
    for art in wiki_eval_articles:
        assert art.text in wiki_split.eval
        title_line = art.text.split("\n", 1)[0]
        assert not re.search(f"^{re.escape(title_line)}$", wiki_split.calib, re.M)
        paragraphs = [p for p in art.text.split("\n") if len(p) > 80]
        assert paragraphs and not [p for p in paragraphs if p in wiki_split.calib]
    frac = len(wiki_split.eval) / (len(wiki_split.eval) + len(wiki_split.calib))
    assert 0.05 < frac < 0.15
    assert len(wiki_split.calib) > 2_000_000


def test_wiki_text_is_clean_and_wikitext_style(wiki_split):
    text = wiki_split.calib + wiki_split.eval
    assert re.search(r"^ = [^=\n]+ = $", text, re.M)  # article titles
    assert re.search(r"^ = = [^=\n]+ = = $", text, re.M)  # sections
    assert re.search(r"^ = = = [^=\n]+ = = = $", text, re.M)  # subsections
    for markup in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "__TOC__", "&nbsp;", "&amp;", "'''"):
        assert markup not in text, markup
    assert "\n\n\n" not in text
    assert " = = References = = " not in text


# ---- wiki.py unit tests (no wheel needed) ---------------------------------------------------------

WIKITEXT = """{{Infobox thing|name=X|value={{nested|1}}}}
'''Thing''' is a [[concept|idea]] in [[philosophy]].<ref>{{cite book|title=Secret}}</ref><ref name="a"/>
[[File:Thing.jpg|thumb|A caption]]
== History ==
It began in 1900 ({{circa}}; {{lang|de|Ding}}).
{| class="wikitable"
| cell || other
|}
=== Early years ===
Text with an [http://example.com external link] &amp; more.
== Empty section ==
== References ==
{{reflist}}
* A citation
[[Category:Things]]
"""


def test_clean_wikitext_strips_markup_and_writes_wikitext_headings():
    out = wiki.clean_wikitext("Thing", WIKITEXT)
    assert out.startswith(" = Thing = \n\n Thing is a idea in philosophy.")
    assert "\n = = History = = \n\n It began in 1900.\n\n = = = Early years = = = \n\n" in out
    assert "Text with an external link & more." in out
    for gone in ("Secret", "caption", "cell", "Category", "Empty section", "References", "citation", "{", "[", "<"):
        assert gone not in out, gone


def test_iter_pages_skips_redirects_and_other_namespaces():
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    page = '<page><title>{t}</title><ns>{n}</ns>{r}<revision><text xml:space="preserve">{x}</text></revision></page>'
    xml = (f'<mediawiki xmlns="{ns}">'
           + page.format(t="Keep", n=0, r="", x="body")
           + page.format(t="Redir", n=0, r='<redirect title="Keep" />', x="#REDIRECT [[Keep]]")
           + page.format(t="Wikipedia:Help", n=4, r="", x="meta")
           + "</mediawiki>").encode()
    assert list(wiki.iter_pages(xml)) == [("Keep", "body")]


def test_missing_wheel_and_failed_download_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ABQLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "offline"))
    with pytest.raises(AbqError, match="scripts/setup.sh"):
        wiki.find_wheel()


# ---- files and named sources ----------------------------------------------------------------------

def test_text_file_round_trip(tmp_path):
    path = _text_file(tmp_path)
    split = load_text(str(path))
    assert split.calib == split.eval == path.read_text(encoding="utf-8")
    assert split.name == str(path)
    assert "pass different files for calibration and evaluation" in split.description


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(AbqError, match=re.escape(str(missing))):
        load_text(str(missing))


def test_unknown_source_lists_accepted_values():
    with pytest.raises(AbqError) as err:
        load_text("wikitext-103")
    for name in ("'wiki'", "'wikitext2'", "'c4'", "text file"):
        assert name in str(err.value)


def test_empty_and_non_utf8_files_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(AbqError, match="empty"):
        load_text(str(empty))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(AbqError, match="not UTF-8"):
        load_text(str(latin))


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_sources_without_datasets_say_pip_install(monkeypatch, source):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(AbqError, match="pip install datasets"):
        load_text(source)


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_sources_offline_give_clear_error(monkeypatch, source):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(AbqError, match="could not be downloaded.*ConnectionError.*hub") as err:
        load_text(source)
    assert "\n" not in str(err.value)


# ---- tokenization ---------------------------------------------------------------------------------

def test_calibration_samples_shape_and_determinism(tmp_path, tokenizer):
    split = load_text(str(_text_file(tmp_path)))
    full = tokenizer(split.calib, add_special_tokens=False, verbose=False)["input_ids"]
    a = calibration_samples(tokenizer, split, n_samples=6, seq_len=16, seed=0)
    b = calibration_samples(tokenizer, split, n_samples=6, seq_len=16, seed=0)
    c = calibration_samples(tokenizer, split, n_samples=6, seq_len=16, seed=1)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    text_ids = " ".join(map(str, full))
    for row in a.tolist():  # every sample is a contiguous window of the calibration tokens
        assert " ".join(map(str, row)) in text_ids


def test_calibration_text_too_short_names_token_count(tokenizer):
    split = TextSplit("tiny", "a few words", "a few words", "test")
    with pytest.raises(AbqError, match=r"has \d+ tokens, fewer than seq_len\+1 = 2049"):
        calibration_samples(tokenizer, split, n_samples=1, seq_len=2048)


def test_eval_ids_match_whole_text_tokenization(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK_CHARS", 200)  # force many chunks on a small text
    split = load_text(str(_text_file(tmp_path)))
    assert len(sources._chunks(split.eval)) > 5 and "".join(sources._chunks(split.eval)) == split.eval
    ids = eval_token_ids(tokenizer, split)
    assert ids.dim() == 1 and ids.dtype == torch.long
    assert ids.tolist() == tokenizer(split.eval, add_special_tokens=False, verbose=False)["input_ids"]


def test_plain_callable_tokenizer_is_accepted(tmp_path):
    class CharTokenizer:  # not a transformers tokenizer: only __call__ -> {"input_ids": [...]}
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(ch) % 256 for ch in text]}

    split = load_text(str(_text_file(tmp_path)))
    assert eval_token_ids(CharTokenizer(), split).tolist() == [ord(ch) % 256 for ch in split.eval]
    assert calibration_samples(CharTokenizer(), split, 3, 32, seed=5).shape == (3, 32)
