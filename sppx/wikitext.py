"""Wikipedia XML dump -> plain prose, one string per article (the default corpus)."""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

# Sections that hold lists of links rather than prose; everything from the first of them on is dropped.
_TRAILING_SECTIONS = re.compile(
    r"^=+\s*(References|External links|See also|Further reading|Notes|Bibliography|Sources|"
    r"Citations|Footnotes|Notes and references)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# Tags whose content is not prose.
_DROP_TAGS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|imagemap|references)\b[^>]*?(/>|>.*?</\1\s*>)",
    re.DOTALL | re.IGNORECASE,
)
_ANY_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_PIPED_LINK = re.compile(r"\[\[([^\[\]|:]*)\|([^\[\]]*)\]\]")
_PLAIN_LINK = re.compile(r"\[\[([^\[\]|:]*)\]\]")
_NAMESPACED_LINK = re.compile(r"\[\[[^\[\]]*:[^\[\]]*\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")


def _until_stable(pattern: re.Pattern, repl: str, text: str) -> str:
    """Apply a substitution until nothing changes (innermost-first removal of nested markup)."""
    while True:
        text, count = pattern.subn(repl, text)
        if count == 0:
            return text


def clean_wikitext(markup: str) -> str:
    """Strip wiki markup and keep the prose: paragraphs separated by blank lines."""
    text = _COMMENT.sub("", markup)
    text = _DROP_TAGS.sub("", text)
    text = _until_stable(_TEMPLATE, "", text)
    text = _until_stable(_TABLE, "", text)
    text = html.unescape(text)  # after tables: "&#124;" must not close one
    text = _ANY_TAG.sub("", text)
    # Links: resolve plain ones innermost-first so that image captions lose their inner links, then
    # drop what is namespaced (files, categories, interlanguage links).
    while True:
        before = text
        text = _PIPED_LINK.sub(r"\2", text)
        text = _PLAIN_LINK.sub(r"\1", text)
        text = _NAMESPACED_LINK.sub("", text)
        if text == before:
            break
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    cut = _TRAILING_SECTIONS.search(text)
    if cut:
        text = text[: cut.start()]
    text = _HEADING.sub(r"\n\n\1\n\n", text)  # own paragraph; short ones are dropped below
    text = _LIST_MARKER.sub("", text)

    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        # Leftovers of tables/templates start with | ! { } and carry no prose.
        lines = [ln for ln in lines if ln and ln[0] not in "|!{}"]
        paragraph = re.sub(r"[ \t]+", " ", " ".join(lines)).strip()
        paragraph = re.sub(r"\(\s*[,;]?\s*\)", "", paragraph)  # "()" left by removed templates
        paragraph = re.sub(r" +([,.;:])", r"\1", paragraph).strip()
        if len(paragraph.split()) >= 5:  # drop stray headings and fragments
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def iter_articles(dump: Path) -> Iterator[tuple[str, str]]:
    """(title, raw markup) of every main-namespace, non-redirect page of a (bz2) MediaWiki XML dump."""
    opener = bz2.open if str(dump).endswith(".bz2") else open
    with opener(dump, "rb") as stream:
        for _, elem in ET.iterparse(stream, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.tag[: -len("page")]
            title = elem.findtext(f"{ns}title") or ""
            namespace = elem.findtext(f"{ns}ns") or "0"
            text = elem.findtext(f"{ns}revision/{ns}text") or ""
            redirect = elem.find(f"{ns}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
            if namespace == "0" and not redirect:
                yield title, text
            elem.clear()
