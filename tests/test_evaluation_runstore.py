"""The run store: atomic item files, resume, refusing other settings, locking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blackbox_vqa.errors import InputError
from blackbox_vqa.evaluation.runstore import ItemRecord, RunStore
from cli_runner import run_cli

SETTINGS = {"model": "m", "methods": ["occlusion"], "limit": 3, "seed": 0}


def _record(key: str, value: float) -> ItemRecord:
    return ItemRecord(key, {"key": key, "status": "done", "value": value},
                      {"occlusion.image": np.full((2, 2), value), "occlusion.words": np.ones(3)})


def test_records_round_trip_and_survive_reopening(tmp_path: Path) -> None:
    with RunStore.open(tmp_path / "run", SETTINGS) as store:
        store.write(_record("q1", 0.5))
        store.write(_record("q2", -1.0))
        assert store.done_keys() == {"q1", "q2"}
    with RunStore.open(tmp_path / "run", SETTINGS) as store:
        assert store.done_keys() == {"q1", "q2"}
        first, second = store.records(["q2", "q1"])
    assert second.meta == {"key": "q1", "status": "done", "value": 0.5}
    np.testing.assert_array_equal(first.arrays["occlusion.image"], np.full((2, 2), -1.0))
    assert set(first.arrays) == {"occlusion.image", "occlusion.words"}
    stored = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert stored == {"schema": "blackbox_vqa.run/1", **SETTINGS}


def test_other_settings_are_refused_with_the_differences_named(tmp_path: Path) -> None:
    RunStore.open(tmp_path, SETTINGS).close()
    with pytest.raises(InputError) as info:
        RunStore.open(tmp_path, {**SETTINGS, "limit": 4, "methods": ["occlusion", "guided-bp"]})
    message = str(info.value)
    assert "other settings" in message and "limit: 3 there, 4 now" in message
    assert "methods: ['occlusion'] there, ['occlusion', 'guided-bp'] now" in message
    assert "choose another --out" in message


def test_stray_temporary_files_are_removed_and_never_counted(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, SETTINGS) as store:
        store.write(_record("q1", 0.0))
    stray = tmp_path / "items" / ".q2.npz.abc123.tmp"
    stray.write_bytes(b"PK\x03\x04 half")
    with RunStore.open(tmp_path, SETTINGS) as store:
        assert not stray.exists()
        assert store.done_keys() == {"q1"}


def test_a_damaged_item_file_is_reported_by_name(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, SETTINGS) as store:
        store.write(_record("q1", 0.0))
        path = store.path("q1")
        path.write_bytes(path.read_bytes()[:40])
        with pytest.raises(InputError, match=r"q1\.npz is damaged.*delete it"):
            store.read("q1")
        with pytest.raises(InputError, match="'q9' is not stored"):
            store.read("q9")


def test_a_second_process_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, SETTINGS), \
            pytest.raises(InputError, match="in use by another process"):
        RunStore.open(tmp_path, SETTINGS)
    RunStore.open(tmp_path, SETTINGS).close()  # free again once closed


def test_folders_that_are_not_runs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "x.npz").write_bytes(b"")
    with pytest.raises(InputError, match=r"no settings\.json"):
        RunStore.open(tmp_path, SETTINGS)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        RunStore.open(a_file, SETTINGS)


def test_keys_must_be_file_names(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, SETTINGS) as store, \
            pytest.raises(InputError, match="not usable as a file name"):
        store.write(_record("../escape", 0.0))


def test_an_item_file_copied_over_another_is_not_trusted(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, SETTINGS) as store:
        store.write(_record("q1", 0.5))
        store.write(_record("q2", -1.0))
        store.path("q1").write_bytes(store.path("q2").read_bytes())  # q2's result as q1's
        assert store.done_keys() == {"q2"}  # q1 is done again
        assert len(store.rejected) == 1
        assert "q1.npz holds item 'q2' (copied over?); item 'q1' will be computed again" \
            in store.rejected[0]
        with pytest.raises(InputError, match=r"q1\.npz holds item 'q2'.*delete it"):
            store.read("q1")
        store.write(_record("q1", 0.5))  # redone: trusted again
        assert store.done_keys() == {"q1", "q2"} and store.rejected == []
        assert store.read("q1").meta["value"] == 0.5


def test_item_files_of_earlier_versions_are_checked_by_their_meta_key(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, SETTINGS) as store:
        for key, named in (("q1", "q1"), ("q2", "q1"), ("q3", None)):
            meta = {"status": "done"} if named is None else {"key": named, "status": "done"}
            np.savez(store.path(key), meta=np.asarray(json.dumps(meta)),
                     **{"occlusion.image": np.zeros((2, 2))})
        assert store.done_keys() == {"q1"}
        assert [m.split("items/")[1] for m in store.rejected] == [
            "q2.npz holds item 'q1' (copied over?); item 'q2' will be computed again",
            "q3.npz does not say which item it holds; item 'q3' will be computed again"]
        assert store.read("q1").meta == {"key": "q1", "status": "done"}


def test_evaluate_recomputes_an_item_whose_file_was_replaced(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["evaluate", "--model", "toys:brightness_model", "--dataset", "easyvqa:test",
            "--limit", "3", "--grid", "4", "--methods", "occlusion", "--out", str(run)]
    code, _, err = run_cli(args)
    assert code == 0, err
    honest = json.loads((run / "results.json").read_text())
    first, second, _ = sorted((run / "items").glob("*.npz"))
    first.write_bytes(second.read_bytes())
    (run / "results.json").unlink()
    code, _, err = run_cli(args)
    assert code == 0, err
    assert "2 stored earlier, 1 to evaluate" in err
    again = json.loads((run / "results.json").read_text())
    assert again["human_attention"] == honest["human_attention"]
    assert again["accuracy"] == honest["accuracy"]
    settings = json.loads((run / "settings.json").read_text())
    settings.pop("schema")
    with RunStore.open(run, settings) as store:
        assert store.read(first.name[:-4]).meta["key"] == first.name[:-4]


def test_a_zip_bomb_item_file_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    import zipfile

    from blackbox_vqa.evaluation.runstore import ITEM_FILE_LIMIT

    with RunStore.open(tmp_path, SETTINGS) as store:
        path = store.path("q1")
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive, \
                archive.open("occlusion.npy", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(ITEM_FILE_LIMIT // len(chunk) + 1):  # one MiB over the bound
                member.write(chunk)
        assert path.stat().st_size < 2 << 20  # small on disk
        with pytest.raises(InputError, match="would unpack to") as info:
            store.read("q1")
        assert str(path) in str(info.value)
        assert "q1" in store.done_keys()  # kept as done: read reports it by name


def test_a_tampered_meta_is_named_by_file_and_settings_are_read_bounded(
    tmp_path: Path,
) -> None:
    import io
    import os

    with RunStore.open(tmp_path, SETTINGS) as store:
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(["not", "an", "object"])),
                 item_key=np.array("q1"))
        store.path("q1").write_bytes(buffer.getvalue())
        with pytest.raises(InputError, match="meta is not a JSON object") as info:
            store.read("q1")
        assert str(store.path("q1")) in str(info.value)
    (tmp_path / "settings.json").unlink()
    os.mkfifo(tmp_path / "settings.json")
    with pytest.raises(InputError, match="not a regular file"):
        RunStore.open(tmp_path, SETTINGS)
