"""Where a command's data-set items run (``--executor``, ``--workers`` and the Ray
options), shared by ``bbvqa evaluate`` and ``bbvqa compare --dataset``, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from blackbox_vqa.errors import InputError

__all__ = [
    "CpusPerWorker",
    "ExecutorName",
    "GpusPerWorker",
    "RayAddress",
    "RayNodeIp",
    "RayWorkingDir",
    "SharedFs",
    "build_executor",
]

ExecutorName = Annotated[str, typer.Option(
    "--executor", help="Where items run: local (this machine's processes) or ray (Ray "
    "actors).")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start "
    "a Ray instance on this machine, loopback only).")]
CpusPerWorker = Annotated[float, typer.Option(
    "--cpus-per-worker", help="CPUs each Ray actor reserves.")]
GpusPerWorker = Annotated[float, typer.Option(
    "--gpus-per-worker", help="GPUs each Ray actor reserves.")]
RayWorkingDir = Annotated[Path | None, typer.Option(
    "--ray-working-dir", help="Folder shipped to the Ray workers (their working directory, "
    "importable): where a package.module:factory spec's module lives.")]
SharedFs = Annotated[bool, typer.Option(
    "--shared-fs", help="Ray workers read the image and map paths themselves (valid on "
    "every node); otherwise each item travels with its files' bytes.")]
RayNodeIp = Annotated[str | None, typer.Option(
    "--ray-node-ip", help="This machine's IP address as the Ray cluster sees it.")]

_RAY_DEFAULTS: dict[str, Any] = {
    "--ray-address": None, "--cpus-per-worker": 1.0, "--gpus-per-worker": 0.0,
    "--ray-working-dir": None, "--shared-fs": False, "--ray-node-ip": None,
}


def build_executor(name: str, workers: int, ray_options: dict[str, Any]) -> Any:
    """The executor named by ``--executor`` with ``workers`` workers; its options are
    checked, and a Ray cluster's address tried, before any work."""
    from blackbox_vqa.evaluation.executors import EXECUTORS

    choice = name.strip().lower()
    if choice not in EXECUTORS:
        raise InputError(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if choice == "local":
        given = [option for option, value in ray_options.items()
                 if value != _RAY_DEFAULTS[option]]
        if given:
            raise InputError(f"{', '.join(given)} only apply with --executor ray")
        from blackbox_vqa.evaluation.executors.local import LocalExecutor

        return LocalExecutor(workers=workers)
    from blackbox_vqa.errors import NotSupportedError
    from blackbox_vqa.evaluation.executors.ray_cluster import (
        RayExecutor,
        RaySettings,
        ray_available,
    )

    if not ray_available():
        raise NotSupportedError("--executor ray needs Ray: pip install 'blackbox-vqa[ray]'")
    folder = ray_options["--ray-working-dir"]
    executor = RayExecutor(RaySettings(
        address=ray_options["--ray-address"], workers=workers,
        cpus_per_worker=ray_options["--cpus-per-worker"],
        gpus_per_worker=ray_options["--gpus-per-worker"],
        working_dir=None if folder is None else str(folder),
        shared_fs=ray_options["--shared-fs"], node_ip=ray_options["--ray-node-ip"]))
    executor.check_cluster()
    return executor
