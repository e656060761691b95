from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blackbox_vqa.errors import InputError
from blackbox_vqa.outputs import (
    atomic_write,
    atomic_write_json,
    check_output_dir,
    new_output_dir,
    prepare_output_dir,
    slugify,
    staged_output_dir,
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


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="model failed"), \
            staged_output_dir(out, force=False, marker="explanation.json") as stage:
        (stage / "image.npy").write_bytes(b"x")
        raise RuntimeError("model failed")
    assert _names(tmp_path) == []  # neither the folder nor its staging copy
    with staged_output_dir(out, force=False, marker="explanation.json") as stage:
        (stage / "image.npy").write_bytes(b"x")
        (stage / "explanation.json").write_text("{}")
        assert not out.exists()
    assert _names(out) == ["explanation.json", "image.npy"] and _names(tmp_path) == ["out"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()


def test_a_staged_folder_is_checked_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "explanation.json").write_text("{}")
    with pytest.raises(InputError, match=r"already holds explanation\.json"):
        check_output_dir(tmp_path / "done", force=False, marker="explanation.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", force=False, marker="explanation.json")
    with pytest.raises(InputError, match=r"cannot create output folder .*file/out: "):
        check_output_dir(tmp_path / "file" / "out", force=False, marker="explanation.json")
    assert _names(tmp_path) == ["done", "file"]


def test_force_moves_files_into_an_existing_folder_marker_last(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "explanation.json").write_text("old")
    (out / "notes.txt").write_text("the user's")
    with staged_output_dir(out, force=True, marker="explanation.json") as stage:
        (stage / "explanation.json").write_text("new")
        (stage / "a.npy").write_bytes(b"a")
    assert _names(out) == ["a.npy", "explanation.json", "notes.txt"]
    assert (out / "explanation.json").read_text() == "new"
    assert _names(tmp_path) == ["out"]


def test_ctrl_c_in_a_real_process_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from blackbox_vqa.outputs import staged_output_dir\n"
        "with staged_output_dir(sys.argv[1], force=False, marker='explanation.json') as s:\n"
        "    (s / 'gradient.npy').write_bytes(b'x')\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert len(_names(tmp_path)) == 1  # the staging folder, hidden
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert _names(tmp_path) == []


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current

