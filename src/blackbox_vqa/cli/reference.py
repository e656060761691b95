"""The command-line reference, generated from the Typer app (the docs site's ``cli.md``).

:func:`markdown_reference` walks the commands Typer builds from :mod:`blackbox_vqa.cli.app`
and writes, for each command, its help text, its usage line and one table per option panel
(option names, type, default, help). The documentation build calls it, so the page can never
fall behind the options that the commands really take.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

__all__ = ["markdown_reference"]

_DEFAULT_PANEL = "Options"

Param = TyperOption | TyperArgument


def _cell(text: str) -> str:
    """``text`` on one line, safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _names(param: Param) -> str:
    names = [*param.opts, *param.secondary_opts]
    if isinstance(param, TyperArgument):
        return f"`{(param.name or '').upper()}`"
    return ", ".join(f"`{name}`" for name in names)


def _type(param: Param, ctx: Any) -> str:
    if isinstance(param, TyperOption) and param.is_flag:
        return "flag"
    kind = str(param.display_type(ctx)).strip("<>").lower()
    return f"{kind} (repeatable)" if param.multiple else kind


def _default(param: Param) -> str:
    if isinstance(param, TyperOption) and param.is_flag and not param.default:
        return ""
    value = param.default
    if value is None or value == () or callable(value):
        return ""
    return f"`{value}`"


def _panels(command: Any) -> Iterator[tuple[str, list[Param]]]:
    panels: dict[str, list[Param]] = {}
    for param in command.params:
        if param.hidden or param.name == "help":
            continue
        panel = param.rich_help_panel or _DEFAULT_PANEL
        panels.setdefault(panel, []).append(param)
    yield from panels.items()


def _command_section(name: str, command: Any, parent: Any) -> list[str]:
    ctx = typer.Context(command, info_name=name, parent=parent)
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## `bbvqa {name}`", "", _cell(command.help or ""), "", "```text",
             f"bbvqa {name} {usage}".rstrip(), "```", ""]
    for panel, params in _panels(command):
        lines += [f"**{panel}**", "", "| option | type | default | help |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {_names(p)} | {_cell(_type(p, ctx))} | {_cell(_default(p))} | "
                  f"{_cell(p.help or '')} |" for p in params]
        lines.append("")
    return lines


def markdown_reference(app: typer.Typer | None = None) -> str:
    """Markdown for every command of ``app`` (default: the ``bbvqa`` app), sorted by name."""
    if app is None:
        from blackbox_vqa.cli.app import app as bbvqa_app

        app = bbvqa_app
    group = typer.main.get_command(app)
    if not isinstance(group, TyperGroup):
        raise TypeError("the app has no sub-commands")
    root = typer.Context(group, info_name="bbvqa")
    lines: list[str] = []
    for name in sorted(group.commands):
        lines += _command_section(name, group.commands[name], root)
    return "\n".join(lines).rstrip() + "\n"
