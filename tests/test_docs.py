"""The README stays short and its Python example runs; the CLI reference covers every option."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import typer

from blackbox_vqa.cli.app import app
from blackbox_vqa.cli.reference import markdown_reference

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_short_and_points_to_the_docs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for needed in ("pip install torch==2.13.0", 'pip install -e ".[dev]"', "\npytest\n",
                   'bbvqa explain --image examples/blue_circle.png --question "what color is '
                   'the shape?"', "mkdocs build --strict"):
        assert needed in readme, needed
    for link in ("docs/images/occlusion.png", "docs/methods/index.md", "docs/models/index.md"):
        assert (ROOT / link).is_file(), link


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    out = io.StringIO()
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    answer, _, shape = out.getvalue().strip().partition(" ")
    assert answer == "blue" and shape.endswith("(16, 16)"), out.getvalue()


def test_the_cli_reference_lists_every_command_and_option() -> None:
    text = markdown_reference()
    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        section = text.split(f"## `bbvqa {name}`", 1)[1].split("\n## `bbvqa ", 1)[0]
        for param in command.params:
            if param.hidden or param.name == "help":
                continue
            for flag in param.opts:
                assert f"`{flag}`" in section, (name, flag)
            if param.help:
                assert " ".join(param.help.split())[:40].replace("|", "\\|") in section


def test_the_cli_reference_refuses_an_app_without_commands() -> None:
    single = typer.Typer()

    @single.command()
    def only() -> None:
        """One command."""

    try:
        markdown_reference(single)
    except TypeError as exc:
        assert "no sub-commands" in str(exc)
    else:
        raise AssertionError("an app without sub-commands was accepted")
