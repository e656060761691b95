"""Where the time of one approximate occlusion explanation goes (issue 22), split by phase
and by layer, in this process's CPU time (``time.process_time``).

Phases: the approximate cells (``image_logits`` with ``tau``), the check cells (the
explainer's exactly scored sample), the self-check (one cell scored exactly by the engine
and once by the plain forward), the original's forward (every node kept), and the rest
(masks, preprocessing, scores, the explainer's bookkeeping). Per layer: the CPU time of
each traced node within the approximate and the check cells, and whether it ran on
patches or on full tensors. Timers wrap the engine's methods from outside (no change to
the package).

Run ``python benchmarks/approx_profile.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from approx import _case, _explain  # this folder (run as a script)
from blackbox_vqa.adapters.torch.incremental import engine as engine_module
from blackbox_vqa.adapters.torch.incremental import scoring as scoring_module
from blackbox_vqa.explainers.occlusion import Occlusion


class Profiler:
    """CPU time per phase and per (phase, node, patched/full), from wrapped methods."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.phase = "rest"
        self.phases: dict[str, float] = defaultdict(float)
        self.nodes: dict[tuple[str, str, str], float] = defaultdict(float)

    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        outer, self.phase = self.phase, name
        start = time.process_time()
        try:
            yield
        finally:
            spent = time.process_time() - start
            self.phases[name] += spent
            self.phases[outer] -= spent  # nested: counted once, in the inner phase
            self.phase = outer

    def install(self) -> Callable[[], None]:
        """Wrap the methods; returns the function that restores them."""
        saved: list[tuple[Any, str, Any]] = []
        prof = self

        def wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
            original = getattr(owner, name)
            saved.append((owner, name, original))
            setattr(owner, name, make(original))

        def image_logits(fn: Any) -> Any:
            def inner(self: Any, run: Any, images: Any, *, tau: float | None = None) -> Any:
                if prof.phase == "check cells":
                    phase = "check cells"
                elif tau is not None:
                    phase = "approx cells"
                elif prof.mode == "exact":
                    phase = "exact cells"
                else:
                    phase = "self-check (engine)"  # approx mode: one cell, exactly
                with prof.in_phase(phase):
                    return fn(self, run, images, tau=tau)
            return inner

        def image_node(fn: Any) -> Any:
            def inner(self: Any, node: Any, run: Any, lookup: Any) -> Any:
                before = self.stats.get("patched", 0), self.stats.get("kept_full", 0)
                start = time.process_time()
                out = fn(self, node, run, lookup)
                if self.stats.get("kept_full", 0) > before[1]:
                    kind = "kept"  # the whole map, the cut re-applied
                elif self.stats.get("patched", 0) > before[0]:
                    kind = "patched"
                else:
                    kind = "full"
                prof.nodes[(prof.phase, node.name, kind)] += time.process_time() - start
                return out
            return inner

        def phase_of(name: str) -> Callable[[Any], Any]:
            def make(fn: Any) -> Any:
                def inner(*args: Any, **kwargs: Any) -> Any:
                    with prof.in_phase(name):
                        return fn(*args, **kwargs)
                return inner
            return make

        wrap(engine_module.IncrementalEngine, "image_logits", image_logits)
        wrap(engine_module.IncrementalEngine, "_image_node", image_node)
        wrap(engine_module.IncrementalEngine, "original", phase_of("original forward"))
        wrap(scoring_module.TorchIncremental, "_self_check", phase_of("self-check (plain)"))
        wrap(Occlusion, "_check", phase_of("check cells"))

        def restore() -> None:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)
        return restore


def profile(name: str, grid: int, incremental: str, repeats: int) -> dict[str, Any]:
    case = _case(name)
    _explain(case, grid, incremental)  # warm-up: traces the module
    totals: list[float] = []
    runs: list[Profiler] = []
    for _ in range(repeats):
        prof = Profiler(incremental)
        restore = prof.install()
        try:
            start = time.process_time()
            _explain(case, grid, incremental)
            totals.append(time.process_time() - start)
        finally:
            restore()
        runs.append(prof)
    best = runs[totals.index(statistics.median(totals))] if repeats % 2 else runs[0]
    phases = {k: v for k, v in best.phases.items() if k != "rest"}
    total = totals[runs.index(best)]
    phases["rest (masks, preprocessing, scores)"] = total - sum(phases.values())
    layers: dict[str, dict[str, float]] = defaultdict(dict)
    for (phase, node, kind), spent in best.nodes.items():
        layers[node][f"{phase}/{kind}"] = spent
    return {"model": name, "incremental": incremental, "grid": grid,
            "cpu_s": totals, "median_cpu_s": statistics.median(totals),
            "phases": phases, "layers": layers}


_SHORT = {"approx cells": "A", "exact cells": "E", "check cells": "C"}


def show(result: dict[str, Any]) -> None:
    print(f"\n== {result['model']} {result['incremental']} grid {result['grid']}: "
          f"CPU s {[round(t, 2) for t in result['cpu_s']]} (median "
          f"{result['median_cpu_s']:.2f}); split of the median run:")
    for phase, spent in sorted(result["phases"].items(), key=lambda kv: -kv[1]):
        print(f"  {phase:40s} {spent:7.3f}  {spent / result['median_cpu_s']:6.1%}")
    print("  per node (CPU s; A approx cells, E exact cells, C check cells; patched, full, "
          "or kept: whole map with the cut re-applied)")
    for node, cols in result["layers"].items():
        parts = [f"{_SHORT.get(k.split('/')[0], k.split('/')[0])}/{k.split('/')[1]} {v:.3f}"
                 for k, v in cols.items() if v >= 0.005]
        if parts:
            print(f"    {node:24s} " + "  ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16-gap,resnet18,vgg16")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--incremental", default="approx:0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps({"load_average_start": list(__import__("os").getloadavg())}))
    results = []
    for name in args.models.split(","):
        for mode in args.incremental.split(","):
            result = profile(name, args.grid, mode, args.repeats)
            show(result)
            results.append(result)
    print(json.dumps({"load_average_end": list(__import__("os").getloadavg())}))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
