from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from blackbox_vqa.errors import InputError
from blackbox_vqa.outputs import (
    atomic_write,
    atomic_write_json,
    new_output_dir,
    prepare_output_dir,
    slugify,
)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})

    def explode(handle: object) -> None:
        handle.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, explode)
    assert target.read_text() == '{\n  "x": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left


def test_atomic_write_gives_the_usual_file_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "m.json", [1])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_nan_is_not_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic_write_json(tmp_path / "n.json", {"x": float("nan")})
    assert not (tmp_path / "n.json").exists()


def test_slugs_and_new_folders(tmp_path: Path) -> None:
    assert slugify("What colour is the shape?") == "what-colour-is-the-shape"
    assert slugify("???") == "explanation"
    assert len(slugify("a" * 200)) == 48
    (tmp_path / "x").mkdir()
    (tmp_path / "x-2").mkdir()
    assert new_output_dir(tmp_path, "x") == tmp_path / "x-3"


def test_prepare_output_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="exists and is not a folder"):
        prepare_output_dir(tmp_path / "file", force=False, marker="m")
    folder = prepare_output_dir(tmp_path / "d" / "e", force=False, marker="m")
    (folder / "m").write_text("")
    with pytest.raises(InputError, match="already holds m"):
        prepare_output_dir(folder, force=False, marker="m")
    assert prepare_output_dir(folder, force=True, marker="m") == folder
