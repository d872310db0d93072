"""Text for calibration and evaluation, and its tokenization.

`load_text` turns a source name or a file path into a `TextSplit` whose calibration and evaluation
parts are stated in its `description`; `calibration_samples` and `eval_token_ids` tokenize them.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from abqllm.errors import AbqError

DEFAULT_SOURCE = "wiki"
HUB_SOURCES = ("wikitext2", "c4")
MIN_ARTICLE_CHARS = 2000  # shorter pages are mostly disambiguation lists and stubs
EVAL_EVERY = 10  # article i goes to eval when i % EVAL_EVERY == EVAL_EVERY - 1
C4_CALIB_DOCS = 3000  # calibration only draws a few hundred windows: the first shard's head is plenty
C4_EVAL_DOCS = 1100  # the GPTQ protocol's C4 evaluation set
ACCEPTED = "'wiki' (default), 'wikitext2', 'c4', or the path of a UTF-8 text file"


@dataclass(frozen=True)
class TextSplit:
    name: str  # "wiki-enwiki-gensim", "wikitext2", "c4" or the file path
    calib: str  # text for calibration
    eval: str  # text for evaluation; disjoint from calib unless one file serves as both
    description: str  # one line stating how the split was made


def load_text(source: str | None = None) -> TextSplit:
    """The calibration/evaluation text named by `source` (see ACCEPTED)."""
    if source is None or source == DEFAULT_SOURCE:
        return _wiki_split()
    if source in HUB_SOURCES:
        return _hub_split(source)
    source = str(source)  # a pathlib.Path works too
    path = Path(source).expanduser()
    if path.is_file():
        return _file_split(path)
    if path.exists():
        raise AbqError(f"text source {source!r} is not a regular file: pass a text file or one of {ACCEPTED}")
    if path.suffix or "/" in source or "\\" in source:
        raise AbqError(f"text file {source} does not exist: check the path, or use {ACCEPTED}")
    raise AbqError(f"unknown text source {source!r}: use {ACCEPTED}")


def _wiki_split() -> TextSplit:
    from abqllm.data.wiki import GENSIM_VERSION, load_articles

    articles = [a for a in load_articles() if len(a.text) >= MIN_ARTICLE_CHARS]
    ev = [a.text for i, a in enumerate(articles) if i % EVAL_EVERY == EVAL_EVERY - 1]
    cal = [a.text for i, a in enumerate(articles) if i % EVAL_EVERY != EVAL_EVERY - 1]
    calib, eval_ = "\n\n".join(cal), "\n\n".join(ev)
    desc = (f"English Wikipedia articles from the enwiki test dump in the gensim=={GENSIM_VERSION} wheel, "
            f"markup stripped WikiText-style; the {len(articles)} articles of >= {MIN_ARTICLE_CHARS} characters, "
            f"in dump order, are split by index: article i goes to evaluation if i % {EVAL_EVERY} == "
            f"{EVAL_EVERY - 1} ({len(ev)} articles, {len(eval_)} chars), else to calibration "
            f"({len(cal)} articles, {len(calib)} chars); the two parts share no article")
    return TextSplit("wiki-enwiki-gensim", calib, eval_, desc)


def _file_split(path: Path) -> TextSplit:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise AbqError(f"text file {path} is not UTF-8 ({e.reason} at byte {e.start}): convert it to UTF-8") from None
    except OSError as e:
        raise AbqError(f"cannot read text file {path} ({e.strerror}): check the path and its permissions") from None
    if not text.strip():
        raise AbqError(f"text file {path} is empty: pass a file with text in it")
    desc = (f"the whole file {path} ({len(text)} chars) serves as both calibration and evaluation text; "
            f"pass different files for calibration and evaluation to keep them apart")
    return TextSplit(str(path), text, text, desc)


def _hub_split(source: str) -> TextSplit:
    need = "it needs `pip install datasets` and a connection to the Hugging Face hub"
    try:
        import datasets
    except ImportError:
        raise AbqError(f"text source {source!r} cannot be loaded: {need} (or use 'wiki' or a text file)") from None
    try:
        if source == "wikitext2":
            train = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            test = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return TextSplit("wikitext2", "\n\n".join(train["text"]), "\n\n".join(test["text"]),
                             "WikiText-2 raw (wikitext-2-raw-v1): calibration = train split, evaluation = test "
                             "split, each joined with blank lines (GPTQ protocol)")
        train = datasets.load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                                      split="train")
        val = datasets.load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                    split="validation")
        calib = "\n\n".join(train.select(range(min(C4_CALIB_DOCS, len(train))))["text"])
        eval_ = " ".join(val.select(range(min(C4_EVAL_DOCS, len(val))))["text"])
        return TextSplit("c4", calib, eval_,
                         f"C4 en: calibration = first {C4_CALIB_DOCS} documents of c4-train.00000-of-01024, "
                         f"evaluation = first {C4_EVAL_DOCS} documents of c4-validation.00000-of-00008 joined "
                         f"with spaces (GPTQ protocol)")
    except Exception as e:  # network, hub or cache errors all mean the same to the user
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise AbqError(f"text source {source!r} could not be downloaded ({type(e).__name__}: {first}): {need}, "
                       f"or use 'wiki' or a text file") from None


# ---- tokenization ---------------------------------------------------------------------------------

_CHUNK_CHARS = 20_000
_token_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TOKEN_CACHE_SIZE = 4


def _chunks(text: str) -> list[str]:
    """Cut text into ~_CHUNK_CHARS pieces just before a blank line that follows a non-space character.

    Tokenizing pieces lets fast tokenizers work in parallel and keeps single calls short. Cutting there
    (not after the newlines) matches where byte-level BPE pre-tokenizers split anyway, so the ids equal
    those of the whole text for GPT-2-style tokenizers.
    """
    out, cur, size = [], [], 0
    for piece in re.split(r"(?<=\S)(?=\n\n)", text):
        if size and size + len(piece) > _CHUNK_CHARS:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += len(piece)
    if cur:
        out.append("".join(cur))
    return out


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    """All token ids of `text`, no special tokens, as a 1-D LongTensor (memoized per tokenizer and text)."""
    from transformers import PreTrainedTokenizerBase

    name = getattr(tokenizer, "name_or_path", "") or ""
    key = None
    if name:  # an unnamed tokenizer (built in memory) cannot be told apart from another: no caching
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        key = (type(tokenizer).__name__, name, vocab, hashlib.sha256(text.encode()).hexdigest())
        if key in _token_cache:
            _token_cache.move_to_end(key)
            return _token_cache[key].clone()
    chunks = _chunks(text)
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        # verbose=False: the text is longer than the model's context on purpose; no length warning.
        per_chunk = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
    else:  # any callable returning {"input_ids": [...]} for one string
        per_chunk = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chunks]
    ids = torch.tensor([i for chunk in per_chunk for i in chunk], dtype=torch.long)
    if key is not None:
        _token_cache[key] = ids
        while len(_token_cache) > _TOKEN_CACHE_SIZE:
            _token_cache.popitem(last=False)
        ids = ids.clone()
    return ids


def calibration_samples(tokenizer, split: TextSplit, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`n_samples` random windows of `seq_len` tokens from the calibration text: LongTensor [n_samples, seq_len].

    Deterministic for a given seed (own torch.Generator, the global RNG is untouched).
    """
    if n_samples < 1 or seq_len < 1:
        raise AbqError(f"calibration needs n_samples >= 1 and seq_len >= 1 (got {n_samples}, {seq_len})")
    ids = _token_ids(tokenizer, split.calib)
    if len(ids) < seq_len + 1:
        raise AbqError(f"the calibration text of {split.name} has {len(ids)} tokens, fewer than seq_len+1 = "
                       f"{seq_len + 1}: use a shorter seq_len or a longer text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def eval_token_ids(tokenizer, split: TextSplit) -> torch.Tensor:
    """The evaluation text as one 1-D LongTensor of token ids (no special tokens)."""
    ids = _token_ids(tokenizer, split.eval)
    if len(ids) == 0:
        raise AbqError(f"the evaluation text of {split.name} gives no tokens: pass a text with content")
    return ids
