"""mkdocs hook: fill ``cli.md`` with the reference generated from the Typer app."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- cli-reference -->"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from blackbox_vqa.cli.reference import markdown_reference

    return markdown.replace(MARKER, markdown_reference())
