"""Approximate incremental occlusion benchmark (issue 22): approx at a sweep of TAU against
exact incremental and the batched-forward floor, side by side in one process.

Models (random weights, 224 x 224, the question branch and 1000-answer head of
``incremental.py``): ``vgg16`` (flatten head, as in ``incremental.py``), ``vgg16-gap``
(the same convolutions, then a global average pool and a linear layer) and ``resnet18``
(``models.py``). Image cells only (``grid x grid``), imagenet-mean fill. Each repeat runs
every method once in a shuffled order; times are medians. Accuracy of each approximate
map against the exact map (computed once, incremental="off"): Spearman over all cells,
overlap of the 10 highest cells, largest absolute error, and the run-time estimate the
JSON reports (mean and max absolute error on 16 seeded cells). ``--clock cpu`` times with
this process's CPU time instead of the wall clock (with ``--threads 1``).

Run ``python benchmarks/approx.py --help``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.explainers.occlusion import Occlusion
from incremental import VGGVQA, vgg_bench_model  # this folder (run as a script)
from models import BenchModel, build_model
from occlusion import build_workload, machine, run_floor

MODELS = ("vgg16", "vgg16-gap", "resnet18")


class VGGGapVQA(VGGVQA):
    """:class:`VGGVQA` with a global-average-pool head: features -> mean over the map ->
    linear 256 -> 1024 (the flatten head's first layer replaced)."""

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        torch.manual_seed(seed + 1)
        self.image_fc = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        features = self.features(image).mean(dim=(2, 3))
        image_embedding = torch.tanh(self.image_fc(features))
        outputs, _ = self.lstm(self.embedding(tokens))
        lengths = (tokens != 0).sum(dim=1).clamp(min=1)
        index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, outputs.shape[2])
        last = outputs.gather(1, index).squeeze(1)
        question_embedding = torch.tanh(self.question_fc(last))
        return self.classifier(image_embedding * question_embedding)  # type: ignore[no-any-return]


def old_engine_module(src: Path) -> Any:
    """The incremental engine module of another checkout's ``src`` folder (e.g. ``git
    archive`` of an earlier commit), loaded beside this one for the A/B scripts."""
    path = src / "blackbox_vqa" / "adapters" / "torch" / "incremental" / "engine.py"
    spec = importlib.util.spec_from_file_location("_old_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_old_engine"] = module
    spec.loader.exec_module(module)
    return module


def ab_parser(description: str, *, models: str, modes: str) -> argparse.ArgumentParser:
    """The A/B scripts' options: the other checkout's ``src``, the models and modes to run
    (comma-separated), the grid and the rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--old-src", type=Path, required=True)
    parser.add_argument("--models", default=models)
    parser.add_argument("--modes", default=modes)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    return parser


def ab_runs(use: dict[str, Callable[[], None]], case: BenchModel, grid: int, mode: str,
            rounds: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """One explanation per variant (``use[name]()`` switches to it) as a warm-up, whose
    maps are returned, then ``rounds`` interleaved rounds of one each: this process's CPU
    seconds per variant and round."""
    times: dict[str, list[float]] = {which: [] for which in use}
    maps: dict[str, Any] = {}
    for which, switch in use.items():
        switch()
        maps[which] = _explain(case, grid, mode).image_map
    for _ in range(rounds):
        for which, switch in use.items():
            switch()
            start = time.process_time()
            _explain(case, grid, mode)
            times[which].append(time.process_time() - start)
    return times, maps


def _case(name: str) -> BenchModel:
    if name == "vgg16":
        return vgg_bench_model()
    if name == "vgg16-gap":
        case = vgg_bench_model()
        base = case.adapter
        adapter = TorchAdapter(VGGGapVQA().eval(), base.answers, base.tokenizer,
                               image_size=224, device="cpu", name="vgg16-gap-vqa")
        return BenchModel(name="vgg16-gap", adapter=adapter, image=case.image,
                          question=case.question, trained=False,
                          description="VGG-16-shaped CNN (widths halved), global average "
                          "pool head, 2-layer LSTM, random weights, 224x224")
    return build_model(name)


SCORE = "log-probability"


def _explain(case: BenchModel, grid: int, incremental: str) -> Any:
    case.adapter.incremental.forget()  # every run recomputes the original's activations
    return Occlusion(case.adapter, grid=grid, words=False, score=SCORE,  # type: ignore[arg-type]
                     incremental=incremental).explain(case.image, case.question)


def accuracy(approx: Any, exact: Any) -> dict[str, Any]:
    a, e = approx.image_map.ravel(), exact.image_map.ravel()
    top_a, top_e = set(np.argsort(-a)[:10].tolist()), set(np.argsort(-e)[:10].tolist())
    found = approx.approx
    return {
        "spearman": float(spearmanr(a, e).statistic),
        "top10_overlap": len(top_a & top_e) / 10,
        "max_abs_error": float(np.abs(a - e).max()),
        "mean_abs_error": float(np.abs(a - e).mean()),
        "map_range": float(e.max() - e.min()),
        "estimate_mean": found.mean_abs_error if found else None,
        "estimate_max": found.max_abs_error if found else None,
        "estimate_spearman": found.spearman if found else None,
    }


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def benchmark_model(name: str, *, grid: int, repeats: int, taus: tuple[float, ...],
                    floor_batches: tuple[int, ...], clock: str = "wall") -> dict[str, Any]:
    case = _case(name)
    print(f"\n== {name}: {case.description}; {grid * grid} cells", flush=True)
    work = build_workload(case, grid)
    exact_map = _explain(case, grid, "off")
    methods: dict[str, Callable[[], Any]] = {"exact": lambda: _explain(case, grid, "exact")}
    for tau in taus:
        methods[f"approx:{tau:g}"] = (lambda t=tau: _explain(case, grid, f"approx:{t:g}"))
    for b in floor_batches:
        methods[f"floor@{b}"] = (lambda b=b: run_floor(work, b))
    for label, fn in methods.items():  # warm-up: traces the module, fills caches
        if not label.startswith("floor"):
            fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    now = CLOCKS[clock]
    for _ in range(repeats):
        order = list(methods)
        random.shuffle(order)
        for label in order:
            start = now()
            methods[label]()
            times[label].append(now() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    floor = min(median[f"floor@{b}"] for b in floor_batches)
    rows: dict[str, Any] = {}
    for label in ("exact", *(f"approx:{t:g}" for t in taus)):
        result = _explain(case, grid, label)
        rows[label] = {"median_s": median[label], "floor_over": floor / median[label],
                       "note": result.incremental_note, **accuracy(result, exact_map)}
        r = rows[label]
        print(f"{label:12s} {r['median_s']:7.3f} s  floor/this {r['floor_over']:6.2f}  "
              f"spearman {r['spearman']:.4f}  top10 {r['top10_overlap']:.1f}  "
              f"max|err| {r['max_abs_error']:.2e} (range {r['map_range']:.2e})  "
              f"est mean {r['estimate_mean']} true mean {r['mean_abs_error']:.2e}",
              flush=True)
    print(f"floor        {floor:7.3f} s  " + "  ".join(
        f"floor@{b} {median[f'floor@{b}']:.3f}" for b in floor_batches), flush=True)
    return {"model": name, "description": case.description, "floor_s": floor,
            "floor": {b: median[f"floor@{b}"] for b in floor_batches}, "rows": rows,
            "runs": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--taus", default="0.3,0.4,0.5,0.6")
    parser.add_argument("--floor-batches", default="16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: time.perf_counter; cpu: this process's CPU time "
                        "(time.process_time; steadier on a shared machine, use --threads 1)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)
    taus = tuple(float(t) for t in args.taus.split(","))
    batches = tuple(int(b) for b in args.floor_batches.split(","))
    print(json.dumps({**machine(), "clock": args.clock}), flush=True)
    results = [benchmark_model(m, grid=args.grid, repeats=args.repeats, taus=taus,
                               floor_batches=batches, clock=args.clock)
               for m in args.models.split(",")]
    print(json.dumps({"load_average_after": list(__import__("os").getloadavg())}))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "clock": args.clock,
                                         "argv": sys.argv, "results": results},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
