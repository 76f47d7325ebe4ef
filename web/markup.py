"""Markdown of the OpenAPI descriptions, rendered to HTML for the ``/docs/api`` page.

OpenAPI descriptions are CommonMark, so the page renders them with markdown-it-py's CommonMark
preset rather than showing raw ``**`` and backticks. Raw HTML in the source is escaped, not passed
through (``html: False``), and the preset refuses ``javascript:`` and similar link targets; so the
output holds no script or style, and the page keeps its strict Content-Security-Policy.
"""

from __future__ import annotations

from functools import lru_cache

from markdown_it import MarkdownIt
from markupsafe import Markup

_MD = MarkdownIt("commonmark", {"html": False})


@lru_cache(maxsize=1024)  # the descriptions are a fixed set: render each once per process
def block(text: str | None) -> Markup:
    """Paragraphs, lists and code blocks, for a description that stands on its own."""
    return Markup(_MD.render(text or ""))  # safe: markdown-it escaped the source's HTML


@lru_cache(maxsize=1024)
def inline(text: str | None) -> Markup:
    """Emphasis, code and links without a wrapping paragraph, for a description in a table cell."""
    return Markup(_MD.renderInline(text or ""))  # safe: markdown-it escaped the source's HTML
