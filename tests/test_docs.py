"""The README stays short and its Python example runs; the CLI reference covers every option."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import typer
from PIL import Image

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


def _readme_block(heading: str) -> str:
    """The first ```bash block under the README's ``## heading``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"\n## {heading}\n", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0].strip()


def test_the_readme_main_command_writes_the_picture_it_shows(tmp_path: Path) -> None:
    """The main command, word for word, run as a real program where a newcomer runs it."""
    argv = shlex.split(_readme_block("Main command"))
    assert argv[:2] == ["bbvqa", "explain"], argv
    program = shutil.which("bbvqa")
    prefix = [program] if program else [sys.executable, "-m", "blackbox_vqa"]
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    done = subprocess.run([*prefix, *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert "A: blue" in done.stdout
    folder = tmp_path / "bbvqa-what-color-is-the-shape"
    assert sorted(p.name for p in folder.iterdir()) == [
        "explanation.json", "occlusion.png", "report.html", "words.png"]
    assert json.loads((folder / "explanation.json").read_text())["answer"] == "blue"
    # The README's picture is this command's map: same size, same pixels up to font
    # rendering (a stale picture of another map differs by far more).
    made = np.asarray(Image.open(folder / "occlusion.png").convert("RGB"), dtype=np.float64)
    shown = np.asarray(Image.open(ROOT / "docs/images/occlusion.png").convert("RGB"),
                       dtype=np.float64)
    assert made.shape == shown.shape
    assert np.abs(made - shown).mean() < 2.0


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


def _documented_commands(text: str) -> list[list[str]]:
    """``bbvqa ...`` command lines of a page: shell blocks (continuations joined) and code spans."""
    lines: list[str] = []
    for block in re.findall(r"```(?:bash|console|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ").split(" #", 1)[0]
            if line.startswith(("bbvqa ", "python -m blackbox_vqa ")):
                lines.append(line)
    lines += re.findall(r"`(bbvqa [^`]+)`", text)
    return [line.split()[1 if line.startswith("bbvqa") else 3:] for line in lines]


def test_every_documented_command_and_option_exists() -> None:
    """A page naming ``bbvqa explain --gone`` fails here, not in a reader's terminal."""
    group = typer.main.get_command(app)
    # docs/extending/ shows commands with the reader's own method or kind installed (its
    # options, e.g. --yes-word, exist only then), so its pages are left out here.
    pages = [*sorted(p for p in (ROOT / "docs").rglob("*.md")
                     if "extending" not in p.relative_to(ROOT).parts), ROOT / "README.md"]
    checked = 0
    for page in pages:
        for words in _documented_commands(page.read_text(encoding="utf-8")):
            if not words or words[0].startswith("-") or words[0].isupper():
                continue  # `bbvqa --help`, `bbvqa COMMAND --help`
            name = page.relative_to(ROOT)
            assert words[0] in group.commands, (name, words)  # type: ignore[attr-defined]
            command = group.commands[words[0]]  # type: ignore[attr-defined]
            flags = {"--help"}.union(*(p.opts + p.secondary_opts for p in command.params))
            for word in words[1:]:
                flag = re.match(r"-{1,2}[A-Za-z][\w-]*", word)
                if flag:
                    assert flag.group(0) in flags, (name, words[0], flag.group(0))
            checked += 1
    assert checked >= 50, checked


def test_the_factory_page_example_runs_as_written(tmp_path: Path) -> None:
    """docs/models/factory.md: its module written out, its command run; the printed
    probability is the image's mean brightness squared, computed here independently."""
    page = (ROOT / "docs" / "models" / "factory.md").read_text(encoding="utf-8")
    module = page.split("```python\n", 1)[1].split("```", 1)[0]
    first, _, body = module.partition("\n")
    assert first == "# brightness.py"
    (tmp_path / "brightness.py").write_text(body, encoding="utf-8")
    shutil.copy(ROOT / "examples" / "blue_circle.png", tmp_path / "blue_circle.png")
    command = page.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["bbvqa", "explain"]
    program = shutil.which("bbvqa")
    prefix = [program] if program else [sys.executable, "-m", "blackbox_vqa"]
    done = subprocess.run([*prefix, *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    pixels = np.asarray(Image.open(ROOT / "examples" / "blue_circle.png").convert("RGB"),
                        dtype=np.float64)
    light = (pixels.mean() / 255.0) ** 2
    printed = f"A: light  (p = {light:.4f})"
    assert printed in done.stdout and f"`{printed}`" in page, (printed, done.stdout[:200])
    assert f"{pixels.mean() / 255.0:.4f}" in page
    for spec, code, message in (
            ("brightness:build?power", 2, "is not key=value"),
            ("brightness:nothing", 1, "has no attribute 'nothing'"),
            ("no_such_module_here:build", 1, "cannot import 'no_such_module_here'")):
        bad = subprocess.run([*prefix, "explain", "--model", spec, "--image", "blue_circle.png",
                              "--question", "is it light?"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, check=False)
        assert bad.returncode == code and message in bad.stderr, (spec, bad.stderr)
        assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    assert [p.name for p in tmp_path.glob("bbvqa-*")] == ["bbvqa-is-it-light"]  # no new one


def test_the_method_pages_quote_the_measured_faithfulness_figures() -> None:
    """Each method page's faithfulness section repeats figures of the measurement page
    (docs/evaluation/faithfulness.md); a figure that is not there is a stale copy."""
    measured = (ROOT / "docs" / "evaluation" / "faithfulness.md").read_text(encoding="utf-8")
    for name in ("occlusion", "gradient", "guided-backprop", "rise"):
        page = (ROOT / "docs" / "methods" / f"{name}.md").read_text(encoding="utf-8")
        section = re.split(r"\n## Faithfulness[^\n]*\n", page)[1].split("\n## ", 1)[0]
        figures = re.findall(r"[+-]?\d+\.\d+", section)
        assert len(figures) >= 6, (name, figures)
        for figure in figures:
            assert figure in measured, (name, figure)
