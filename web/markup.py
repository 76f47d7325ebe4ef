"""Markdown rendered to HTML for the pages: OpenAPI descriptions on ``/docs/api`` and the model card
on ``/model``.

OpenAPI descriptions are CommonMark, so the page renders them with markdown-it-py's CommonMark
preset rather than showing raw ``**`` and backticks. Raw HTML in the source is escaped, not passed
through (``html: False``), and the preset refuses ``javascript:`` and similar link targets; so the
output holds no script or style, and the page keeps its strict Content-Security-Policy. The model
card is the same CommonMark plus GitHub's tables (it is written to read well on GitHub too).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup

_MD = MarkdownIt("commonmark", {"html": False})
_DOC = MarkdownIt("commonmark", {"html": False}).enable("table")

# An image's address in the source -> (its address on the site, width, height), or None to drop it.
ImageResolver = Callable[[str], "tuple[str, int | None, int | None] | None"]


@lru_cache(maxsize=1024)  # the descriptions are a fixed set: render each once per process
def block(text: str | None) -> Markup:
    """Paragraphs, lists and code blocks, for a description that stands on its own."""
    return Markup(_MD.render(text or ""))  # safe: markdown-it escaped the source's HTML


@lru_cache(maxsize=1024)
def inline(text: str | None) -> Markup:
    """Emphasis, code and links without a wrapping paragraph, for a description in a table cell."""
    return Markup(_MD.renderInline(text or ""))  # safe: markdown-it escaped the source's HTML


def document(text: str, images: ImageResolver, *, shift: int = 1, id_prefix: str = "") -> Markup:
    """A whole Markdown document (tables included) as HTML for a page.

    Headings move ``shift`` levels down (the page has its own ``h1``) and get ids (``id_prefix`` +
    a slug of their text) so sections can be linked; each image's address goes through ``images``,
    which may also give its size, or drop it (an address the site does not serve).
    """
    tokens = _DOC.parse(text)
    used: set[str] = set()
    for i, token in enumerate(tokens):
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + shift, 6)}"
        if token.type == "heading_open":
            token.attrSet("id", id_prefix + _unique(slug(tokens[i + 1].content), used))
        if token.type == "inline" and token.children:
            token.children = _resolve_images(token.children, images)
    return Markup(_DOC.renderer.render(tokens, _DOC.options, {}))  # safe: markdown-it escaped the source's HTML


def _resolve_images(children: list[Token], images: ImageResolver) -> list[Token]:
    kept = []
    for child in children:
        if child.type == "image":
            found = images(str(child.attrGet("src") or ""))
            if found is None:
                continue
            src, width, height = found
            child.attrSet("src", src)
            if width and height:
                child.attrSet("width", str(width))
                child.attrSet("height", str(height))
        kept.append(child)
    return kept


def slug(text: str) -> str:
    """A heading's text as an id: lower case, words joined by hyphens."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


def sections(text: str, level: int = 2) -> list[tuple[str, str]]:
    """The document cut at its headings of ``level`` (outside code fences): (title, body) pairs; the
    text before the first such heading comes first, titled ""."""
    marker = "#" * level + " "
    out: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced and line.startswith(marker):
            out.append((line[len(marker):].strip(), []))
        else:
            out[-1][1].append(line)
    return [(title, "\n".join(lines).strip("\n")) for title, lines in out]
