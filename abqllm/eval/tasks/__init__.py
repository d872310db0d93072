"""Local lm-eval tasks built from the held-apart evaluation text (no dataset hub needed).

The task YAMLs next to this file are ordinary lm-eval task configs; `TASKS_DIR` is what
`TaskManager(include_path=...)` (or `lm_eval --include_path`) needs. Their documents come from
`custom_dataset: !function hooks.<task>`, which calls `dataset()` below: on first use it builds
the task's JSONL from the evaluation part of the default Wikipedia text (the articles with
i % 10 == 9, never used for calibration) and writes it to <cache>/lm_eval/ (`ABQLLM_CACHE` moves
the cache); later runs read that file. Building is deterministic: no random numbers, only the
text, fixed rules and sha256 orderings, so every machine gets the same file. The file name holds
BUILD_VERSION and a digest of the text; bump BUILD_VERSION whenever a rule below changes.

abq_lastword (LAMBADA-style): a passage of whole sentences from one paragraph, 30-150 words,
whose final word (3+ letters, not an abbreviation) already appeared earlier in the passage, so the
context makes it predictable. The model sees the passage without that word; metrics are the
perplexity of the word and the accuracy of predicting all its tokens greedily.

abq_nextsent (4-way multiple choice): the opening sentences of a paragraph (25+ words) and four
candidate next sentences: the true one and the three sentences of other paragraphs of the same
article closest to it in length (ties broken by sha256). Metrics: acc and length-normalized acc_norm.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from abqllm.errors import AbqError

TASKS_DIR = Path(__file__).parent
LOCAL_TASKS = ("abq_lastword", "abq_nextsent")
BUILD_VERSION = 1

_HEADING = re.compile(r"^ (=(?: =)*) (.*?) \1 $")
# A sentence ends at . ! ? after a lowercase letter, digit, bracket or quote, before a capital or quote.
_SENT_END = re.compile(r'(?<=[a-z0-9)"][.!?])\s+(?=["(A-Z])')
_WORD = re.compile(r"^[A-Za-z]{3,}$")
_ABBREVIATIONS = {"mrs", "etc", "inc", "ltd", "vol", "eds", "gen", "col", "sgt", "rev", "prof", "fig", "nos"}
_STRIP = ".,;:!?\"'()[]"


def articles(text: str) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) of each article in WikiText-style text (` = Title = ` starts an article)."""
    out = []
    for line in text.split("\n"):
        m = _HEADING.match(line)
        if m and len(m.group(1).split()) == 1:
            out.append((m.group(2), []))
        elif m or not line.strip():
            continue
        else:
            if not out:  # text before any title: one untitled article
                out.append(("", []))
            out[-1][1].append(line.strip())
    return out


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENT_END.split(paragraph) if s.strip()]


def lastword_docs(text: str, min_words: int = 30, max_words: int = 150) -> list[dict]:
    docs = []
    for title, paragraphs in articles(text):
        for paragraph in paragraphs:
            passage: list[str] = []
            for sentence in sentences(paragraph):
                passage.append(sentence)
                words = " ".join(passage).split()
                if len(words) > max_words:  # start a fresh passage at this sentence
                    passage = [sentence]
                    words = sentence.split()
                if len(words) < min_words or not sentence.endswith("."):
                    continue
                target = words[-1][:-1]
                if not _WORD.match(target) or target.lower() in _ABBREVIATIONS:
                    continue
                if target.lower() in {w.strip(_STRIP).lower() for w in words[:-1]}:
                    docs.append({"context": " ".join(words[:-1]), "target": target, "article": title})
                    passage = []
    return docs


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def nextsent_docs(text: str, min_context_words: int = 25, n_choices: int = 4) -> list[dict]:
    docs = []
    for title, paragraphs in articles(text):
        by_paragraph = [sentences(p) for p in paragraphs]
        for i, sents in enumerate(by_paragraph):
            k = next((k for k in range(1, len(sents))
                      if len(" ".join(sents[:k]).split()) >= min_context_words), None)
            if k is None:
                continue
            true = sents[k]
            n_true = len(true.split())
            if not 5 <= n_true <= 60:
                continue
            pool = {s for j, other in enumerate(by_paragraph) if j != i for s in other
                    if 5 <= len(s.split()) <= 60 and s != true}
            if len(pool) < n_choices - 1:
                continue
            distractors = sorted(pool, key=lambda s: (abs(len(s.split()) - n_true), _digest(title, true, s)))
            choices = distractors[: n_choices - 1]
            label = int(_digest(title, true), 16) % n_choices
            choices.insert(label, true)
            docs.append({"context": " ".join(sents[:k]), "choices": choices, "label": label, "article": title})
    return docs


_BUILDERS = {"abq_lastword": lastword_docs, "abq_nextsent": nextsent_docs}


def data_file(task: str, text: str | None = None) -> Path:
    """The task's JSONL in the cache, built from `text` (default: the default evaluation text) if missing."""
    from abqllm.data.wiki import cache_dir

    if task not in _BUILDERS:
        raise AbqError(f"no local task {task!r}; local tasks are {', '.join(LOCAL_TASKS)}")
    if text is None:
        from abqllm.data.sources import load_text

        text = load_text(None).eval
    path = cache_dir() / "lm_eval" / f"{task}-v{BUILD_VERSION}-{_digest(text)[:12]}.jsonl"
    if not path.exists():
        docs = _BUILDERS[task](text)
        if not docs:
            raise AbqError(f"the evaluation text gives no {task} examples; use the default text")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # readers never see half a file
    return path


def dataset(task: str):
    """The task's documents as a datasets.DatasetDict with one "test" split (what lm-eval expects)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(data_file(task))})
