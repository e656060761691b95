"""``bbvqa compare --dataset`` through the executors: local processes give the same
comparison as the serial run; executor options are checked like ``bbvqa evaluate``'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli_runner import run_cli

MODELS = ["--model", "toys:brightness_model", "--model", "eval_toys:slow_brightness"]
BASE = ["compare", *MODELS, "--dataset", "easyvqa:test", "--limit", "3", "--seed", "2",
        "--grid", "4"]


def without_timings(doc: Any) -> Any:
    """The document without wall times and its creation time."""
    if isinstance(doc, dict):
        return {k: without_timings(v) for k, v in doc.items()
                if k not in ("seconds", "created")}
    if isinstance(doc, list):
        return [without_timings(v) for v in doc]
    return doc


def test_local_processes_compare_exactly_as_the_serial_run(tmp_path: Path) -> None:
    code, _, err = run_cli([*BASE, "--out", str(tmp_path / "serial")])
    assert code == 0, err
    code, _, err = run_cli([*BASE, "--workers", "2", "--out", str(tmp_path / "parallel")])
    assert code == 0, err
    serial, parallel = (json.loads((tmp_path / run / "comparison.json").read_text())
                        for run in ("serial", "parallel"))
    assert len(serial["items"]) == 3
    assert without_timings(parallel) == without_timings(serial)
    assert (tmp_path / "parallel" / "report.html").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--executor", "dask"], "--executor must be one of local, ray, got 'dask'"),
        (["--ray-node-ip", "127.0.0.2"], "--ray-node-ip only apply with --executor ray"),
    ],
)
def test_bad_executor_options_are_one_line_exit_2(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    code, out, err = run_cli([*BASE, *extra, "--out", str(tmp_path / "run")])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert message in err


def test_workers_are_refused_for_one_image(tmp_path: Path, square_image: Path) -> None:
    code, _, err = run_cli(["compare", *MODELS, "--image", str(square_image), "--question",
                            "is it bright?", "--workers", "2", "--out", str(tmp_path / "r")])
    assert code == 2 and "--executor and --workers only apply with --dataset" in err


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_the_ray_executor_without_ray_installed_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    from blackbox_vqa.evaluation.executors import ray_cluster

    monkeypatch.setattr(ray_cluster, "ray_available", lambda: False)
    args = BASE if command == "compare" else [
        "evaluate", "--model", "toys:brightness_model", "--dataset", "easyvqa:test",
        "--limit", "1"]
    code, out, err = run_cli([*args, "--executor", "ray", "--out", str(tmp_path / "run")])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--executor ray needs Ray: pip install 'blackbox-vqa[ray]'" in err
    assert not (tmp_path / "run").exists()
