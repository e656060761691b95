"""Hostile model files (issue 23, items 8, 9 and 11): bounded, type-checked reads; wrong
types and deep nesting are one line and exit 2; ``${VAR}`` expands in headers only; every
TOML model-file example in the documentation loads as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from blackbox_vqa.bounded_files import MODEL_FILE_LIMIT
from blackbox_vqa.cli.model_options import ModelSettings, resolve
from blackbox_vqa.errors import InputError
from cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _explain(model: str, image: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(["explain", "--model", model, "--image", str(image), "--question",
                    "is it red?", "--dry-run", *extra])


@pytest.mark.parametrize(("line", "key"), [
    ("header = 5", "header"),
    ('threads = "2"', "threads"),
    ('http_max_response_mb = "5"', "http_max_response_mb"),
    ("http_timeout = true", "http_timeout"),
    ('headers = ["A: b", 3]', "header"),
    ("vocab = 7", "vocab"),
])
def test_wrong_types_in_a_model_file_are_one_line_naming_the_key(
    line: str, key: str, square_image: Path, tmp_path: Path,
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(f'[m]\nspec = "http://127.0.0.1:9"\n{line}\n', encoding="utf-8")
    code, _, err = _explain(f"@{path}:m", square_image)
    assert code == 2, err
    assert f"{key} must be" in err
    assert "unexpected" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_deeply_nested_model_file_is_refused_not_recursed(
    suffix: str, square_image: Path, tmp_path: Path,
) -> None:
    path = tmp_path / f"models{suffix}"
    depth = 100_000
    if suffix == ".json":
        path.write_text('{"m": ' + "[" * depth + "]" * depth + "}", encoding="utf-8")
    else:
        path.write_text("m = " + "[" * depth + "]" * depth + "\n", encoding="utf-8")
    code, _, err = _explain(f"@{path}:m", square_image)
    assert code == 2, err
    assert "nests deeper than" in err and "Traceback" not in err


def test_model_files_that_are_devices_fifos_or_too_big_are_refused(
    square_image: Path, tmp_path: Path,
) -> None:
    code, _, err = _explain("@/dev/zero:m", square_image)
    assert code == 2 and "not a regular file" in err, err
    fifo = tmp_path / "models.toml"
    os.mkfifo(fifo)  # nobody writes: a read would block forever
    code, _, err = _explain(f"@{fifo}:m", square_image)
    assert code == 2 and "not a regular file" in err, err
    big = tmp_path / "big.toml"
    with big.open("wb") as handle:
        handle.truncate(MODEL_FILE_LIMIT + 1)  # sparse: one byte over the bound
    code, _, err = _explain(f"@{big}:m", square_image)
    assert code == 2 and f"the most accepted is {MODEL_FILE_LIMIT}" in err, err


def test_env_vars_expand_in_headers_only_and_a_spec_never_shows_a_secret(
    square_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOSTILE_SECRET", "s3cr3t-value")
    path = tmp_path / "models.toml"
    path.write_text('[m]\nspec = "hf:/models/${HOSTILE_SECRET}"\n'
                    '[h]\nspec = "http://127.0.0.1:9"\n'
                    'headers = ["Authorization: Bearer ${HOSTILE_SECRET}"]\n',
                    encoding="utf-8")
    code, out, err = _explain(f"@{path}:m", square_image)
    assert code == 2, err
    assert "headers only" in err
    assert "s3cr3t-value" not in out + err
    spec, label, settings = resolve(f"@{path}:h", ModelSettings())
    assert settings.values["header"] == ("Authorization: Bearer s3cr3t-value",)
    assert "s3cr3t" not in spec + label


def _toml_examples() -> list[tuple[str, str]]:
    found = []
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"```toml\n(.*?)```", text, flags=re.S):
            if re.search(r"^spec\s*=", block, flags=re.M):
                found.append((str(page.relative_to(ROOT)), block))
    return found


def test_the_documentation_has_model_file_examples() -> None:
    assert _toml_examples()


@pytest.mark.parametrize(("page", "block"), _toml_examples())
def test_every_model_file_example_in_the_docs_loads_as_written(
    page: str, block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tomllib

    for name in set(re.findall(r"\$\{([A-Za-z_]\w*)\}", block)):
        monkeypatch.setenv(name, "example-token")
    path = tmp_path / "models.toml"
    path.write_text(block, encoding="utf-8")
    from blackbox_vqa.specs import spec_kind

    for name, table in tomllib.loads(block).items():
        try:
            spec_kind(table["spec"])
        except InputError:
            continue  # a plug-in kind the page registers in Python first
        try:
            spec, label, settings = resolve(f"@{path}:{name}", ModelSettings())
            settings.extra(spec)
        except InputError as exc:
            pytest.fail(f"{page} [{name}]: {exc}")
        assert label == name


def test_answers_and_vocab_files_are_read_bounded(tmp_path: Path) -> None:
    from blackbox_vqa.adapters.onnx.runtime import ANSWERS_FILE_LIMIT, read_answers

    with pytest.raises(InputError, match="--answers file /dev/zero is not a regular file"):
        read_answers("/dev/zero")
    big = tmp_path / "answers.txt"
    with big.open("wb") as handle:
        handle.truncate(ANSWERS_FILE_LIMIT + 1)
    with pytest.raises(InputError, match=f"the most accepted is {ANSWERS_FILE_LIMIT}"):
        read_answers(big)
