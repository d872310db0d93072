"""Default real text: English Wikipedia articles from the gensim 4.4.0 wheel, cleaned WikiText-style.

No dataset hub is reachable here, but PyPI is, and gensim's wheel ships a (shortened) 2016 enwiki
XML dump as test data. We read that member straight out of the wheel (gensim itself is never
installed), strip the markup with mwparserfromhell and write headings the way WikiText does
(` = Title = `, ` = = Section = = `), so perplexities are measured on WikiText-like prose.
The cleaned articles are cached as one JSON file; bump CLEAN_VERSION whenever the cleaning changes.
"""

from __future__ import annotations

import bz2
import functools
import glob
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mwparserfromhell
from mwparserfromhell.nodes import Tag, Template, Text, Wikilink

from abqllm.errors import AbqError

GENSIM_VERSION = "4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# sha256 of the compressed member (the same test file is in every platform's wheel).
MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
CLEAN_VERSION = 4  # bump when the cleaning below changes: it names the cache file

# Tags whose content is not prose (citations, tables, formulas, image galleries, code).
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap",
              "syntaxhighlight", "source", "score", "hiero", "graph", "mapframe", "templatedata"}
# Wikilinks that are not running text: media, categories, interlanguage links.
_DROP_LINK_NS = {"file", "image", "media", "category"}
_LANG_PREFIX = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)*:")
# Trailing sections that are lists of citations or links, not prose.
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "sources",
                  "bibliography", "citations", "footnotes", "notes and references", "works cited",
                  "references and notes", "external link", "primary sources", "secondary sources"}
_HEADING = re.compile(r"^ (=(?: =)*) (.*?) \1 $")
# mwparserfromhell leaves malformed constructs as plain text, so refs, tables and magic words are
# also cut out of the raw wikitext before parsing.
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_MAGIC = re.compile(r"__[A-Z]+__")
_MARKUP_LEFT = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}|</?[A-Za-z][^<>]*>|^[|!]")


@dataclass(frozen=True)
class Article:
    title: str
    text: str  # starts with the WikiText title line ` = Title = `


def cache_dir() -> Path:
    return Path(os.environ.get("ABQLLM_CACHE") or Path.home() / ".cache" / "abqllm")


def find_wheel() -> Path:
    """The gensim wheel in <cache>/wheels, downloaded with pip if it is not there yet."""
    wheels = cache_dir() / "wheels"
    pattern = str(wheels / f"gensim-{GENSIM_VERSION}-*.whl")
    if not glob.glob(pattern):
        wheels.mkdir(parents=True, exist_ok=True)
        # --only-binary: a source tarball would not contain the test data in a readable place.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"gensim=={GENSIM_VERSION}", "-d", str(wheels)]
        subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(pattern))
    if not found:
        raise AbqError(f"the default Wikipedia text needs the gensim=={GENSIM_VERSION} wheel in {wheels}, "
                       f"which is missing and could not be downloaded: run scripts/setup.sh or put a "
                       f"gensim-{GENSIM_VERSION}-*.whl (pip download --no-deps gensim=={GENSIM_VERSION}) there")
    return Path(found[0])


def _read_dump(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise AbqError(f"{wheel} is not a usable gensim wheel ({e}): delete it and run scripts/setup.sh") from None
    if hashlib.sha256(data).hexdigest() != MEMBER_SHA256:
        raise AbqError(f"the Wikipedia dump in {wheel} does not match the expected sha256: "
                       f"delete the wheel and run scripts/setup.sh to fetch gensim=={GENSIM_VERSION} again")
    return bz2.decompress(data)


def iter_pages(xml_bytes: bytes):
    """Yield (title, wikitext) of main-namespace, non-redirect pages in dump order."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        # Children carry the MediaWiki export namespace ({http://www.mediawiki.org/xml/export-0.10/}).
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
        ns, redirect, text = fields.get("ns"), fields.get("redirect"), fields.get("text")
        if ns is not None and ns.text == "0" and redirect is None and text is not None and text.text:
            yield fields["title"].text, text.text
        elem.clear()  # keep memory flat on big dumps


def _heading_line(level: int, title: str) -> str:
    return " " + "= " * level + title + " =" * level + " "


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with an enclosing node
        pass


def _drop_tables(wikitext: str) -> str:
    """Remove `{| ... |}` tables, nested ones included (they open and close at the start of a line)."""
    out, depth = [], 0
    for line in wikitext.split("\n"):
        s = line.lstrip(" :")
        if s.startswith("{|"):
            depth += 1
        elif depth and s.startswith("|}"):
            depth -= 1
        elif not depth:
            out.append(line)
    return "\n".join(out)


def clean_wikitext(title: str, wikitext: str) -> str:
    """Plain WikiText-style text of one article: markup stripped, link text kept, headings ` = = X = = `."""
    wikitext = _MAGIC.sub("", _drop_tables(_REF.sub("", wikitext)))
    code = mwparserfromhell.parse(wikitext)
    for node in code.filter(forcetype=(Template, Tag, Wikilink), recursive=True):
        if isinstance(node, Template):
            _remove(code, node)
        elif isinstance(node, Tag) and str(node.tag).strip().lower() in _DROP_TAGS:
            _remove(code, node)
        elif isinstance(node, Wikilink):
            target = str(node.title).strip()
            if target.split(":", 1)[0].strip().lstrip(":").lower() in _DROP_LINK_NS or _LANG_PREFIX.match(target):
                _remove(code, node)
    for heading in code.filter_headings(recursive=True):
        name = " ".join(heading.title.strip_code().split())
        try:
            code.replace(heading, Text("\n" + _heading_line(heading.level, name) + "\n"))
        except ValueError:
            pass
    text = code.strip_code(normalize=True, collapse=True)
    return _tidy(_heading_line(1, title) + "\n\n" + text)


def _tidy(text: str) -> str:
    text = text.replace("\xa0", " ").replace("\u200b", "")
    lines = []
    for line in text.split("\n"):
        if _HEADING.match(line):
            lines.append(line)
            continue
        line = re.sub(r"[ \t]+", " ", line).strip()
        # Removed templates (pronunciations, dates, conversions) leave empty brackets and stray separators.
        line = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", line)
        line = re.sub(r"\(\s*\)", "", line)
        line = re.sub(r" +([,.;:])", r"\1", line).replace("''", "")
        line = re.sub(r"^[,;:]\s*", "", line.strip())
        # Whatever markup survived (broken templates or table rows) is not prose: drop the line.
        if line and not re.fullmatch(r"[\W_]+", line) and not _MARKUP_LEFT.search(line):
            lines.append(" " + line)  # WikiText lines start with a space
        else:
            lines.append("")
    return "\n".join(_drop_sections(lines)).strip("\n")


def _drop_sections(lines: list[str]) -> list[str]:
    """Drop reference/link sections, then headings whose section ended up empty; collapse blank runs."""
    out, skip_level = [], None
    for line in lines:
        m = _HEADING.match(line)
        level = len(m.group(1).split()) if m else None
        if skip_level is not None:
            if level is None or level > skip_level:
                continue
            skip_level = None
        if level and level > 1 and m.group(2).strip().lower() in _DROP_SECTIONS:
            skip_level = level
            continue
        out.append(line)
    # Walk backwards: a heading followed only by headings of the same or higher rank has no text.
    kept, next_level = [], 0  # rank of the next kept content: 0 = end, huge = prose
    for line in reversed(out):
        m = _HEADING.match(line)
        if m:
            level = len(m.group(1).split())
            if level > 1 and next_level <= level:
                continue
            next_level = level
        elif line:
            next_level = 10**6
        kept.append(line)
    kept.reverse()
    collapsed = []
    for line in kept:
        if line or (collapsed and collapsed[-1]):
            collapsed.append(line)
    # Blank line around headings, as in WikiText.
    result = []
    for line in collapsed:
        if _HEADING.match(line) and result and result[-1]:
            result.append("")
        if result and _HEADING.match(result[-1]) and line:
            result.append("")
        result.append(line)
    return result


def _cache_file() -> Path:
    return cache_dir() / f"wiki-enwiki-gensim-{GENSIM_VERSION}-clean-v{CLEAN_VERSION}.json"


def _write_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is plain public text
        os.replace(tmp, path)  # readers never see a half-written cache
    except BaseException:
        os.unlink(tmp)
        raise


def build_articles(wheel: Path) -> list[Article]:
    data = _read_dump(wheel)
    return [Article(title, clean_wikitext(title, text)) for title, text in iter_pages(data)]


@functools.lru_cache(maxsize=4)
def _load(cache_file: Path) -> tuple[Article, ...]:
    if cache_file.exists():
        try:
            payload = json.loads(cache_file.read_text(encoding="utf-8"))
            if payload.get("version") == CLEAN_VERSION:
                return tuple(Article(a["title"], a["text"]) for a in payload["articles"])
        except (ValueError, KeyError, TypeError):
            pass  # corrupt cache: rebuild it
    articles = build_articles(find_wheel())
    _write_atomic(cache_file, {"version": CLEAN_VERSION, "source": f"gensim=={GENSIM_VERSION}:{MEMBER}",
                               "articles": [{"title": a.title, "text": a.text} for a in articles]})
    return tuple(articles)


def load_articles() -> list[Article]:
    """All cleaned main-namespace articles of the dump, in dump order (built once, then read from cache)."""
    return list(_load(_cache_file()))
