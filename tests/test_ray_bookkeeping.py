"""The Ray executor's bookkeeping (retries, failed items, results kept from a dying actor)
against a scripted stand-in for Ray: exact, fast, and runs where Ray is not installed;
with one item in flight per actor (the executor's setting) and with two.

The stand-in runs each actor call at once, in this process, with the real actor body
(``_Worker``); an actor "dies" on the items named in ``poison``, failing that call and
every later one. ``wait`` hands out failed calls first, the order that once made a
finished result count as the one lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from blackbox_vqa.datasets import Item
from blackbox_vqa.errors import ModelLoadError
from blackbox_vqa.evaluation.executors import ray_cluster
from blackbox_vqa.evaluation.executors.ray_cluster import RaySettings, _Run
from blackbox_vqa.evaluation.runner import EvalConfig
from blackbox_vqa.evaluation.runstore import ItemRecord
from blackbox_vqa.explainers.registry import MethodSettings
from vqa_fixture import square_image


class ActorDied(Exception):
    pass


class TaskFailed(Exception):
    pass


class _Exceptions:
    RayActorError = ActorDied
    RayTaskError = TaskFailed


class _Ref:
    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error


class _Method:
    def __init__(self, actor: _Actor, name: str) -> None:
        self.actor, self.name = actor, name

    def remote(self, *args: Any) -> _Ref:
        return self.actor.call(self.name, args)


class _Actor:
    def __init__(self, fake: FakeRay, body: Any) -> None:
        self.fake, self.body, self.dead = fake, body, False
        self.start = _Method(self, "start")
        self.evaluate = _Method(self, "evaluate")

    def call(self, name: str, args: tuple[Any, ...]) -> _Ref:
        if not self.dead and name == "evaluate" and args[0].key in self.fake.poison:
            self.dead = True
            self.fake.deaths.append(args[0].key)
        ref = (_Ref(error=ActorDied("the actor died")) if self.dead
               else _Ref(value=getattr(self.body, name)(*args)))
        self.fake.refs.append(ref)
        return ref


class _Remote:
    def __init__(self, fake: FakeRay, cls: type) -> None:
        self.fake, self.cls = fake, cls

    def options(self, **_: Any) -> _Remote:
        return self

    def remote(self, *args: Any) -> _Actor:
        self.fake.actors += 1
        return _Actor(self.fake, self.cls(*args))


class FakeRay:
    exceptions = _Exceptions

    def __init__(self, poison: Sequence[str] = (), *, latest_first: bool = False) -> None:
        self.poison = set(poison)
        self.latest_first = latest_first
        self.refs: list[_Ref] = []
        self.deaths: list[str] = []
        self.actors = 0

    def remote(self, cls: type) -> _Remote:
        return _Remote(self, cls)

    def wait(self, refs: list[_Ref], num_returns: int, timeout: float) \
            -> tuple[list[_Ref], list[_Ref]]:
        ordered = sorted(refs, key=lambda ref: ref.error is None)  # failures first
        if self.latest_first:  # Ray does not promise to report results in call order
            ordered.reverse()
        return ordered[:num_returns], ordered[num_returns:]

    def get(self, ref: _Ref, timeout: float | None = None) -> Any:
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor: _Actor, no_restart: bool) -> None:
        actor.dead = True

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}


@pytest.fixture(autouse=True, params=[1, 2], ids=["one-in-flight", "two-in-flight"])
def in_flight(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The executor sends one item at a time; the bookkeeping must also hold for more."""
    monkeypatch.setattr(ray_cluster, "IN_FLIGHT_PER_WORKER", request.param)
    return int(request.param)


CONFIG = EvalConfig(model="toys:brightness_model", methods=("occlusion",),
                    options=MethodSettings(grid=2), seed=5)


@pytest.fixture
def items(tmp_path: Path) -> list[Item]:
    image = tmp_path / "square.png"
    Image.fromarray(square_image()).save(image)
    return [Item(key=f"k{i}", question=f"is it bright {i}?", image=str(image), answer=None)
            for i in range(6)]


def _run(fake: FakeRay, items: list[Item], **settings: Any) \
        -> tuple[list[ItemRecord], dict[str, Any]]:
    records: list[ItemRecord] = []
    facts: dict[str, Any] = {}
    options = {"workers": 2, **settings}
    _Run(fake, RaySettings(**options), CONFIG, records.append, facts).run(items)
    return records, facts


@pytest.mark.parametrize("latest_first", [False, True])
def test_every_item_is_delivered_once_without_faults(
    items: list[Item], latest_first: bool
) -> None:
    fake = FakeRay(latest_first=latest_first)
    records, facts = _run(fake, items)
    assert sorted(r.key for r in records) == [item.key for item in items]
    assert all(r.meta["status"] == "done" for r in records)
    assert facts["worker_deaths"] == 0 and fake.actors == 2


def test_an_item_that_kills_its_worker_is_tried_three_times_then_failed(
    items: list[Item]
) -> None:
    fake = FakeRay(poison=["k3"])
    records, facts = _run(fake, items)
    keys = [r.key for r in records]
    assert sorted(keys) == [item.key for item in items]  # each once
    failed = next(r for r in records if r.key == "k3")
    assert failed.meta["status"] == "failed"
    assert failed.meta["reason"] == "its Ray worker died on each of 3 tries (ActorDied)"
    assert failed.meta["detail"] == "ActorDied: the actor died"
    assert fake.deaths == ["k3"] * 3  # the items queued behind it cost no try
    assert facts["worker_deaths"] == 3 and facts["items_retried"] == 2
    assert facts["items_failed"] == 1
    assert fake.actors <= 2 + 3  # at most a fresh actor per death
    assert all(r.meta["status"] == "done" for r in records if r.key != "k3")


@pytest.mark.parametrize("retries", [0, 1, 4])
def test_the_number_of_tries_is_bounded_by_max_retries(
    items: list[Item], retries: int
) -> None:
    fake = FakeRay(poison=["k0"])
    records, facts = _run(fake, items, max_retries=retries)
    assert fake.deaths == ["k0"] * (retries + 1)
    assert facts["items_failed"] == 1 and len(records) == len(items)


def test_a_model_that_fails_to_load_stops_the_run_with_its_error(items: list[Item]) -> None:
    config = EvalConfig(model="no_such_module_here:factory", methods=("occlusion",))
    with pytest.raises(ModelLoadError, match=r"cannot import 'no_such_module_here'.*"
                       r"--ray-working-dir DIR, or install it on every node$"):
        _Run(FakeRay(), RaySettings(workers=2), config, lambda r: None, {}).run(items)
