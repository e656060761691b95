"""The Ray executor: items run in Ray actors, each loading the model once.

The driver (this process) connects to a cluster (``address``: ``auto``, ``HOST:PORT`` or
``ray://HOST:PORT``) or starts a Ray instance here (``address=None``), starts
``workers`` actors (``cpus_per_worker``, ``gpus_per_worker`` each), keeps one item in
flight per actor and hands each result to ``on_result`` as it finishes. Actors do the
same work as the local executor (``config.load()``, then ``evaluate`` per item), with the
same torch thread count, so they give the same results.

No shared file system is assumed: unless ``shared_fs``, each item travels with the bytes
of its image and human-map files (read here just before it is sent). The factory module
of a ``package.module:factory`` spec must import on the workers: ``working_dir`` is
shipped to them through Ray's runtime environment.

Faults: an actor whose process dies (killed, out of memory, its node lost) loses only the
item it was running: that item is retried on a fresh actor, up to ``max_retries`` times,
then its result is ``config.failed(item, reason, detail)`` (``bbvqa evaluate``: a record
with status ``"failed"``). A model error stops the run, as it does locally.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import blackbox_vqa.errors as error_types
from blackbox_vqa.datasets import Item, read_item_files
from blackbox_vqa.errors import (
    BlackboxVQAError,
    ClusterError,
    InputError,
    ModelError,
    NotSupportedError,
)
from blackbox_vqa.evaluation.executors import ItemWork, WorkConfig
from blackbox_vqa.evaluation.workers import set_torch_threads

__all__ = ["LOCAL_NODE_IP", "RayExecutor", "RaySettings", "ray_available"]

LOCAL_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1"
"""The address a Ray instance started here binds its node to: loopback only. On Linux the
whole 127/8 is loopback, and Ray treats 127.0.0.1 specially (it swaps in the machine's
interface address), so 127.0.0.2 is used there."""

IN_FLIGHT_PER_WORKER = 1
"""Items sent to an actor at a time. One, so that when an actor dies the item it was
running is known: with two, Ray can fail a call the actor had finished (its reply not yet
in) together with the one that killed it, and the wrong item would be charged the try."""
START_TIMEOUT_S = 300.0
_POLL_S = 1.0
_REASON_CHARS = 300


def ray_available() -> bool:
    """Whether Ray can be imported here."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class RaySettings:
    """Where and how the actors run.

    ``address``: None starts a Ray instance here (bound to :data:`LOCAL_NODE_IP`);
    ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` joins a running cluster. ``node_ip``:
    this (driver) machine's address as the cluster sees it (``ray.init``'s
    ``_node_ip_address``). ``max_retries``: tries after the first for an item whose worker
    died. ``connect_timeout_s``: how long to wait for the cluster to answer.
    """

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    working_dir: str | None = None
    shared_fs: bool = False
    node_ip: str | None = None
    max_retries: int = 2
    connect_timeout_s: float = 10.0
    start_timeout_s: float = START_TIMEOUT_S
    env_vars: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")
        if not self.cpus_per_worker > 0:
            raise InputError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if not self.gpus_per_worker >= 0:
            raise InputError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.max_retries < 0:
            raise InputError(f"retries must be >= 0, got {self.max_retries}")
        if self.working_dir is not None and not os.path.isdir(self.working_dir):
            raise InputError(f"--ray-working-dir {self.working_dir} is not a folder")


@dataclass(frozen=True)
class _Failure:
    """An error raised in an actor, sent back as data: the error class's name and text."""

    kind: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> _Failure:
        if isinstance(exc, BlackboxVQAError):
            return cls(type(exc).__name__, str(exc))
        return cls("ModelError", f"unexpected {type(exc).__name__}: {exc}")

    def error(self, suffix: str = "") -> BlackboxVQAError:
        kind = getattr(error_types, self.kind, None)
        if not (isinstance(kind, type) and issubclass(kind, BlackboxVQAError)):
            kind = ModelError
        return kind(self.message + suffix)


class _Worker:
    """The body of one Ray actor: loads the model once, then evaluates items."""

    def __init__(self, config: WorkConfig) -> None:
        self._config = config
        self._evaluator: ItemWork | None = None

    def start(self) -> tuple[int, dict[str, str]] | _Failure:
        """Load the model: ``(pid, methods not available)``, or the failure."""
        try:
            self._evaluator = self._config.load()
            set_torch_threads(self._config.threads)
        except Exception as exc:
            return _Failure.of(exc)
        return os.getpid(), dict(self._evaluator.unavailable)

    def evaluate(self, item: Item, files: Mapping[str, bytes]) -> Any:
        """The record of ``item`` (``files``: its files' bytes, when sent along)."""
        if self._evaluator is None:
            return _Failure("ModelError", "the worker has no model (start() was not called)")
        try:
            return self._evaluator.evaluate(item, files=files)
        except Exception as exc:
            return _Failure.of(exc)


@dataclass
class _Slot:
    """One actor as the driver sees it."""

    handle: Any
    started: Any  # the ObjectRef of start() until it answers, then None
    pid: int | None = None
    flight: deque[tuple[Any, Item, int]] = field(default_factory=deque)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:_REASON_CHARS]}"


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _resolve_address(address: str) -> str:
    """``auto`` -> the address of the cluster started on this machine (Ray's own lookup)."""
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # a Ray without that helper: leave the lookup to ray.init
        return address
    try:
        return str(canonicalize_bootstrap_address_or_die("auto"))
    except (ConnectionError, ValueError) as exc:
        raise ClusterError(f"--ray-address auto: no running Ray cluster found on this "
                           f"machine ({' '.join(str(exc).split())[:_REASON_CHARS]})") from exc


def _probe(address: str, timeout_s: float) -> None:
    """Fail fast, in one line, when nothing answers at ``address`` (Ray itself would retry
    for minutes and then exit the process)."""
    found = _host_port(address)
    if found is None:
        raise InputError(f"--ray-address must be auto, HOST:PORT or ray://HOST:PORT, "
                         f"got {address!r}")
    try:
        with socket.create_connection(found, timeout=timeout_s) as sock:
            answer = _grpc_handshake(sock, timeout_s)
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: "
                           f"{exc.strerror or exc}") from exc
    if answer is not None:
        raise ClusterError(f"{address} accepts connections but is not a Ray cluster "
                           f"({answer}); check --ray-address")


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, SETTINGS, stream 0


def _grpc_handshake(sock: socket.socket, timeout_s: float) -> str | None:
    """Open HTTP/2 as a gRPC client does (Ray's GCS and Ray Client both speak gRPC): a
    gRPC server answers with its SETTINGS frame. None when it did; else what went wrong.
    Bounded by ``timeout_s`` in all."""
    import time

    sock.sendall(_HTTP2_PREFACE + _EMPTY_SETTINGS)
    deadline = time.monotonic() + timeout_s
    header = b""
    while len(header) < 9:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no gRPC answer within {timeout_s:g} s"
        sock.settimeout(left)
        try:
            chunk = sock.recv(9 - len(header))
        except TimeoutError:
            return f"no gRPC answer within {timeout_s:g} s"
        if not chunk:
            return "it closed the connection on a gRPC greeting"
        header += chunk
    if header[3] != 0x04 or header[5:9] != b"\x00\x00\x00\x00":
        return f"it answered {header[:9]!r}, not an HTTP/2 SETTINGS frame"
    return None


class RayExecutor:
    """Runs items in Ray actors; see the module's docstring."""

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self._facts: dict[str, Any] = {"executor": "ray", "workers": settings.workers}

    def describe(self) -> Mapping[str, Any]:
        return dict(self._facts)

    def check_cluster(self) -> None:
        """Fail now, in one line, when the cluster cannot be reached (before any work)."""
        if self.settings.address is not None:
            _probe(_resolve_address(self.settings.address.strip()),
                   self.settings.connect_timeout_s)

    def run(
        self,
        items: Sequence[Item],
        config: WorkConfig,
        on_result: Callable[[Any], None],
    ) -> None:
        """Evaluate ``items`` on the actors; ``on_result`` is called here, once per item."""
        if not items:
            return
        with self._session() as ray:
            _Run(ray, self.settings, config, on_result, self._facts).run(items)

    @contextmanager
    def _session(self) -> Iterator[Any]:
        """Connected to Ray for the run; disconnects (and stops an instance it started)."""
        try:
            import ray
        except ImportError as exc:
            raise NotSupportedError("--executor ray needs Ray: pip install "
                                    "'blackbox-vqa[ray]'") from exc
        if ray.is_initialized():  # a library caller connected already: use it, leave it
            yield ray
            return
        self._connect(ray)
        try:
            yield ray
        finally:
            ray.shutdown()

    def _connect(self, ray: Any) -> None:
        settings = self.settings
        runtime_env: dict[str, Any] = {}
        if settings.working_dir is not None:
            runtime_env["working_dir"] = os.path.abspath(settings.working_dir)
        if settings.env_vars:
            runtime_env["env_vars"] = dict(settings.env_vars)
        options: dict[str, Any] = {
            "runtime_env": runtime_env or None, "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if settings.address is None:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            cpus = max(os.cpu_count() or 1,
                       int(-(-settings.workers * settings.cpus_per_worker // 1)))
            # "local": a new instance, never one found through RAY_ADDRESS or /tmp/ray.
            options.update(address="local", include_dashboard=False, num_cpus=cpus,
                           _node_ip_address=settings.node_ip or LOCAL_NODE_IP)
            where = "a local Ray instance"
        else:
            address = _resolve_address(settings.address.strip())
            _probe(address, settings.connect_timeout_s)
            options["address"] = address
            if settings.node_ip is not None:
                options["_node_ip_address"] = settings.node_ip
            where = f"the Ray cluster at {address}"
        try:
            ray.init(**options)
        except SystemExit as exc:  # Ray exits the process when the GCS never answers
            raise ClusterError(f"cannot connect to {where} (Ray gave up with exit code "
                               f"{exc.code})") from exc
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            raise ClusterError(f"cannot connect to {where}: {_first_line(exc)}") from exc
        self._facts["address"] = settings.address or "local"


class _Run:
    """One run's bookkeeping on the driver: actors, items in flight, retries."""

    def __init__(
        self, ray: Any, settings: RaySettings, config: WorkConfig,
        on_result: Callable[[Any], None], facts: dict[str, Any],
    ) -> None:
        self.ray = ray
        self.settings = settings
        self.config = config
        self.on_result = on_result
        self.facts = facts
        self.remote = ray.remote(_Worker).options(
            num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker,
            max_restarts=0, max_task_retries=0)
        self.slots: list[_Slot] = []
        self.owner: dict[Any, _Slot] = {}  # ObjectRef -> its actor
        self.queue: deque[tuple[Item, int]] = deque()
        self.deaths = 0
        self.retried = 0
        self.failed = 0
        self.start_deaths = 0

    def run(self, items: Sequence[Item]) -> None:
        self.queue.extend((item, 0) for item in items)
        try:
            for _ in range(min(self.settings.workers, len(items))):
                self._start_actor()
            self._loop()
        finally:
            for slot in self.slots:
                with suppress(Exception):  # already gone, or the cluster is: nothing to do
                    self.ray.kill(slot.handle, no_restart=True)
            self.facts.update(worker_deaths=self.deaths, items_retried=self.retried,
                              items_failed=self.failed)

    def _start_actor(self) -> None:
        handle = self.remote.remote(self.config)
        slot = _Slot(handle=handle, started=handle.start.remote())
        self.slots.append(slot)
        self.owner[slot.started] = slot

    def _loop(self) -> None:
        begun = time.monotonic()
        while self.queue or any(slot.flight for slot in self.slots):
            self._dispatch()
            if not any(slot.pid is not None for slot in self.slots):
                waited = time.monotonic() - begun
                if waited > self.settings.start_timeout_s:
                    raise ClusterError(self._no_worker_message(waited))
            ready, _ = self.ray.wait(list(self.owner), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                slot = self.owner.pop(ref, None)
                if slot is not None:
                    self._finished(slot, ref)

    def _dispatch(self) -> None:
        for slot in self.slots:
            while slot.pid is not None and self.queue and \
                    len(slot.flight) < IN_FLIGHT_PER_WORKER:
                item, tries = self.queue.popleft()
                files = {} if self.settings.shared_fs else read_item_files(item)
                ref = slot.handle.evaluate.remote(item, files)
                slot.flight.append((ref, item, tries))
                self.owner[ref] = slot

    def _finished(self, slot: _Slot, ref: Any) -> None:
        try:
            value = self.ray.get(ref)
        except self._lost_worker_errors() as exc:
            self._lost(slot, exc)
            return
        except self.ray.exceptions.RayTaskError as exc:
            raise ModelError(f"a Ray worker failed: {_first_line(exc)}") from exc
        if ref == slot.started:
            self._started(slot, value)
            return
        # An actor runs its calls in order, but ray.wait may report them out of order.
        index = next(i for i, flight in enumerate(slot.flight) if flight[0] == ref)
        _, item, _ = slot.flight[index]
        del slot.flight[index]
        self._deliver(item, value)

    def _deliver(self, item: Item, value: Any) -> None:
        if isinstance(value, _Failure):
            raise value.error(f" (item {item.key})")
        self.on_result(value)

    def _started(self, slot: _Slot, value: Any) -> None:
        slot.started = None
        if isinstance(value, _Failure):
            suffix = ""
            if value.kind == "ModelLoadError" and "cannot import" in value.message:
                suffix = (" on the Ray workers; ship the module's folder with "
                          "--ray-working-dir DIR, or install it on every node")
            raise value.error(suffix)
        slot.pid = value[0]  # value[1]: methods not available (in every record too)

    def _lost_worker_errors(self) -> tuple[type[BaseException], ...]:
        found = self.ray.exceptions
        return tuple(getattr(found, name) for name in (
            "RayActorError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError",
            "ObjectLostError", "LocalRayletDiedError") if hasattr(found, name))

    def _lost(self, slot: _Slot, exc: BaseException) -> None:
        """The actor's process is gone: retry its running item, resend the queued ones."""
        self.deaths += 1
        self.slots.remove(slot)
        for ref, _, _ in slot.flight:
            self.owner.pop(ref, None)
        if slot.started is not None:
            self.owner.pop(slot.started, None)
            self.start_deaths += 1
            if self.start_deaths > self.settings.workers + self.settings.max_retries:
                raise ClusterError(f"Ray workers keep dying while loading the model "
                                   f"({self.start_deaths} so far; last: {_first_line(exc)})")
        flights = self._finished_before_death(list(slot.flight))
        if flights:
            _, item, tries = flights[0]
            if tries + 1 > self.settings.max_retries:
                self.failed += 1
                reason = (f"its Ray worker died on each of {tries + 1} tries "
                          f"({type(exc).__name__})")
                self.on_result(self.config.failed(item, reason, _first_line(exc)))
            else:
                self.retried += 1
                self.queue.appendleft((item, tries + 1))
            for _, queued, queued_tries in reversed(flights[1:]):
                self.queue.appendleft((queued, queued_tries))
        if self.queue or any(s.flight for s in self.slots):
            self._start_actor()

    def _finished_before_death(self, flights: list[tuple[Any, Item, int]]) \
            -> list[tuple[Any, Item, int]]:
        """Deliver the results the actor finished before it died (its calls run in order,
        so they lead); return the rest, the one it was running first."""
        while flights:
            ref, item, _ = flights[0]
            try:
                value = self.ray.get(ref, timeout=_POLL_S)
            except Exception:  # lost with the actor (or not finished): send it again
                return flights
            flights.pop(0)
            self._deliver(item, value)
        return flights

    def _no_worker_message(self, waited: float) -> str:
        resources = self.ray.cluster_resources()
        return (f"no Ray worker started within {waited:.0f} s: each asks for "
                f"{self.settings.cpus_per_worker:g} CPU and {self.settings.gpus_per_worker:g} "
                f"GPU; the cluster has {resources.get('CPU', 0):g} CPU and "
                f"{resources.get('GPU', 0):g} GPU")
