"""Incremental occlusion benchmark (issue 14): exact incremental scoring against the
batched-forward floor, Captum, and today's plain path, side by side in one process.

Models: ``reference`` and ``resnet18`` from ``models.py``, and ``vgg16``: a VGG-16-shaped
CNN (13 3x3 convolutions in five blocks, max pools, halved channel widths 32-256, flatten
and a linear layer over 7 x 7 x 256) with the same 2-layer LSTM question branch and
1000-answer head as ``resnet18``, random weights, 224 x 224. For each model one full
explanation (``grid x grid`` cells plus every word) is timed as:

- ``incr@T``: ``Occlusion(adapter)`` with the adapter's incremental scoring on (the
  default), patches materialised past share ``T`` of a map;
- ``plain``: ``Occlusion(adapter, incremental="off")``: today's path;
- ``floor@B`` and ``captum@K``: as in ``occlusion.py`` (the module alone over pre-built
  perturbed tensors in slices of ``B``; Captum's ``Occlusion`` with
  ``perturbations_per_eval=K`` plus the word drops);
- ``words-incr`` / ``words-plain``: word occlusion alone (image branch once, or not).

Each repeat runs every method once in a shuffled order; figures are medians; the peak
RSS of one extra run per headline method is measured afterwards. Exactness: the largest
difference between the incremental and the plain maps, beside the map's range, and
beside the difference between two plain runs at different batch sizes (what float
reassociation alone gives).

Run ``python benchmarks/incremental.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blackbox_vqa.adapters.torch.incremental.engine import IncrementalEngine
from blackbox_vqa.adapters.torch.incremental.scoring import TorchIncremental
from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.text import WordTokenizer
from models import (  # this folder (run as a script)
    _RESNET_VOCAB_TEXT,
    RESNET_QUESTION,
    BenchModel,
    build_model,
    synthetic_image,
)
from occlusion import (
    Timings,
    build_workload,
    machine,
    peak_memory,
    pin_allocator,
    run_captum,
    run_floor,
    timed,
)

MODELS = ("reference", "resnet18", "vgg16")
# The floor's and Captum's best settings measured in BENCHMARKS.md ("Occlusion"): the
# small reference model runs best in large batches, the 224 x 224 models in 8-16.
FLOOR_BATCHES = {"reference": (64, 128), "resnet18": (8, 16), "vgg16": (8, 16)}
CAPTUM_BEST_OF = {"reference": (64,), "resnet18": (16,), "vgg16": (16,)}


class VGGVQA(nn.Module):
    """VGG-16-shaped CNN (widths halved) + 2-layer LSTM + point-wise product + MLP.

    ``forward(image [B,3,224,224], tokens [B,T]) -> logits [B, num_answers]``.
    """

    def __init__(self, *, width: float = 0.5, num_answers: int = 1000, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        in_ch = 3
        for block, (channels, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3),
                                                   (512, 3))):
            out_ch = int(channels * width)
            for _ in range(convs):
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
                in_ch = out_ch
            layers.append(nn.MaxPool2d(2))
            del block
        self.features = nn.Sequential(*layers)
        self.image_fc = nn.Sequential(nn.Linear(in_ch * 7 * 7, 1024), nn.ReLU(),
                                      nn.Linear(1024, 1024))
        self.embedding = nn.Embedding(1000, 300, padding_idx=0)
        self.lstm = nn.LSTM(300, 512, num_layers=2, batch_first=True)
        self.question_fc = nn.Linear(512, 1024)
        self.classifier = nn.Sequential(nn.Linear(1024, 1000), nn.ReLU(),
                                        nn.Linear(1000, num_answers))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        features = self.features(image).flatten(1)
        image_embedding = torch.tanh(self.image_fc(features))
        outputs, _ = self.lstm(self.embedding(tokens))
        lengths = (tokens != 0).sum(dim=1).clamp(min=1)
        index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, outputs.shape[2])
        last = outputs.gather(1, index).squeeze(1)
        question_embedding = torch.tanh(self.question_fc(last))
        return self.classifier(image_embedding * question_embedding)  # type: ignore[no-any-return]


def vgg_bench_model(*, seed: int = 0) -> BenchModel:
    tokenizer = WordTokenizer.build([_RESNET_VOCAB_TEXT])
    module = VGGVQA(seed=seed).eval()
    adapter = TorchAdapter(module, [f"answer{i}" for i in range(1000)], tokenizer,
                           image_size=224, device="cpu", name="vgg16-vqa")
    n_params = sum(p.numel() for p in module.parameters())
    return BenchModel(
        name="vgg16", adapter=adapter, image=synthetic_image(224, seed=seed),
        question=RESNET_QUESTION, trained=False,
        description=(f"VGG-16-shaped CNN (widths halved) + 2-layer LSTM VQA net, random "
                     f"weights (seed {seed}), 224x224, {n_params / 1e6:.1f} M parameters"),
    )


def _case(name: str) -> BenchModel:
    return vgg_bench_model() if name == "vgg16" else build_model(name)


_ENGINES: dict[tuple[str, float], TorchIncremental] = {}


def _explain(case: BenchModel, grid: int, threshold: float | None, *, image: bool = True,
             batch: int | str = "auto") -> Any:
    """One explanation. The module is traced once per threshold (as a long-lived adapter
    does; :func:`trace_seconds` times it), but every explanation recomputes and re-checks
    the original input's activations."""
    adapter = case.adapter
    if threshold is not None:
        key = (case.name, threshold)
        if key not in _ENGINES:
            _ENGINES[key] = TorchIncremental("exact", threshold=threshold)
        adapter.incremental = _ENGINES[key]
        adapter.incremental.forget()
    mode = "off" if threshold is None else "exact"
    explainer = Occlusion(adapter, grid=grid, incremental=mode, image=image, batch_size=batch)
    return explainer.explain(case.image, case.question)


class _Float64(nn.Module):
    """``module`` in float64: the reference the float32 maps are measured against."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(module).double()

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(image.double(), tokens)  # type: ignore[no-any-return]


def float64_errors(case: BenchModel, grid: int, plain: Any, fast: Any) -> dict[str, float]:
    """Largest distance of the float32 plain and incremental image maps from the plain
    map computed in float64 (how exact float32 can be on this model at all)."""
    a = case.adapter
    wide = TorchAdapter(_Float64(a.module), a.answers, a.tokenizer,
                        image_size=a.preprocessing.image_size, mean=a.preprocessing.mean,
                        std=a.preprocessing.std, device="cpu", incremental="off")
    reference = Occlusion(wide, grid=grid, words=False).explain(case.image, case.question)
    return {"plain32_vs_float64": float(np.abs(plain.image_map - reference.image_map).max()),
            "incremental_vs_float64": float(np.abs(fast.image_map - reference.image_map).max())}


def trace_seconds(case: BenchModel) -> float:
    """CPU seconds to trace the module with torch.fx (paid once per adapter)."""
    start = time.process_time()
    IncrementalEngine(case.adapter.module)
    return time.process_time() - start


def benchmark_model(name: str, *, grid: int, repeats: int, thresholds: tuple[float, ...],
                    floor_batches: tuple[int, ...], captum: tuple[int, ...],
                    memory: bool, use_cpu: bool, float64: bool) -> dict[str, Any]:
    case = _case(name)
    work = build_workload(case, grid)
    print(f"\n== {name}: {case.description}; {work.total} evaluations", flush=True)
    methods: dict[str, Callable[[], Any]] = {}
    for t in thresholds:
        methods[f"incr@{t:g}"] = functools.partial(_explain, case, grid, t)
    methods["plain"] = functools.partial(_explain, case, grid, None)
    for b in floor_batches:
        methods[f"floor@{b}"] = functools.partial(run_floor, work, b)
    for k in captum:
        methods[f"captum@{k}"] = functools.partial(run_captum, work, k)
    methods["words-incr"] = functools.partial(_explain, case, grid, thresholds[0], image=False)
    methods["words-plain"] = functools.partial(_explain, case, grid, None, image=False)

    # exactness (and warm-up)
    plain = _explain(case, grid, None)
    plain_other = _explain(case, grid, None, batch=64)
    exact = {}
    for t in thresholds:
        fast = _explain(case, grid, t)
        assert fast.incremental == "exact", fast.incremental_note
        exact[f"{t:g}"] = {
            "image_max_abs": float(np.abs(fast.image_map - plain.image_map).max()),
            "words_max_abs": float(np.abs(fast.word_map - plain.word_map).max()),
        }
    if float64:
        exact["float64"] = float64_errors(case, grid, plain, fast)
    words_fast = _explain(case, grid, thresholds[0], image=False)
    exact["words_only_max_abs"] = float(np.abs(words_fast.word_map - plain.word_map).max())
    exactness = {
        "incremental_vs_plain": exact,
        "image_map_range": float(np.ptp(plain.image_map)),
        "word_map_range": float(np.ptp(plain.word_map)),
        "plain_batch_auto_vs_64_image_max_abs": float(
            np.abs(plain_other.image_map - plain.image_map).max()),
    }
    print(f"   exactness: {json.dumps(exactness)}", flush=True)
    if repeats == 0:  # exactness only
        return {"model": name, "description": case.description, "exactness": exactness}
    for fn in methods.values():
        fn()

    timings, cpu = Timings(), Timings()
    for rep in range(repeats):
        order = list(methods)
        random.Random(rep).shuffle(order)
        for label in order:
            start = time.process_time()
            timings.add(label, timed(methods[label]), 0)
            cpu.add(label, time.process_time() - start, 0)
        print(f"   repeat {rep + 1}/{repeats} (load {os.getloadavg()[0]:.2f}): " + ", ".join(
            f"{label} {timings.runs[label][-1]:.2f}" for label in methods), flush=True)
    if use_cpu:  # one thread on a shared machine: this process's CPU time is steadier
        timings, wall = cpu, timings
    else:
        wall = timings
    med = {label: timings.median(label) for label in methods}
    incr = min((f"incr@{t:g}" for t in thresholds), key=med.__getitem__)
    floor = min((f"floor@{b}" for b in floor_batches), key=med.__getitem__)
    best_captum = min((f"captum@{k}" for k in captum), key=med.__getitem__)
    ratios = {
        "floor/incr": med[floor] / med[incr],
        "captum-best/incr": med[best_captum] / med[incr],
        "plain/incr": med["plain"] / med[incr],
        "words: plain/incr": med["words-plain"] / med["words-incr"],
    }
    paired = {
        "floor/incr": _paired(timings.runs[floor], timings.runs[incr]),
        "captum-best/incr": _paired(timings.runs[best_captum], timings.runs[incr]),
        "plain/incr": _paired(timings.runs["plain"], timings.runs[incr]),
        "words: plain/incr": _paired(timings.runs["words-plain"], timings.runs["words-incr"]),
    }
    mem: dict[str, dict[str, float]] = {}
    if memory:
        for label in (incr, "plain", floor, best_captum):
            mem[label] = {}
            with peak_memory(mem[label]):
                methods[label]()
    return {"model": name, "description": case.description, "evaluations": work.total,
            "trace_s": trace_seconds(case),
            "clock": "cpu" if use_cpu else "wall",
            "wall_medians_s": {label: wall.median(label) for label in methods},
            "repeats": repeats, "medians_s": med, "runs_s": timings.runs, "best_incr": incr,
            "floor": floor, "captum_best": best_captum, "ratios": ratios,
            "paired_ratios": paired, "memory_mib": mem, "exactness": exactness,
            "note": _explain(case, grid, float(incr.split("@")[1])).incremental_note}


def _paired(num: list[float], den: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def report(r: dict[str, Any]) -> str:
    lines = [f"### {r['model']}: {r['description']}", "",
             f"{r['evaluations']} evaluations, {r['repeats']} repeats, {r['clock']} clock; "
             f"best incremental: "
             f"{r['best_incr']}, floor: {r['floor']}, Captum best: {r['captum_best']}", "",
             "| method | median s | min s | median wall s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|"]
    for label, seconds in r["medians_s"].items():
        rss = r["memory_mib"].get(label, {}).get("rss_mib")
        lines.append(f"| {label} | {seconds:.2f} | {min(r['runs_s'][label]):.2f} | "
                     f"{r['wall_medians_s'][label]:.2f} | "
                     f"{'' if rss is None else f'{rss:.0f}'} |")
    lines += ["", "| ratio | of medians | median per repeat |", "|---|---:|---:|"]
    for key, value in r["ratios"].items():
        lines.append(f"| {key} | {value:.2f} | {r['paired_ratios'][key]:.2f} |")
    lines += ["", f"exactness: {json.dumps(r['exactness'])}", f"note: {r['note']}",
              f"torch.fx trace (once per adapter, not in the times above): "
              f"{r['trace_s'] * 1000:.0f} ms"]
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="0: exactness only")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--thresholds", type=_floats, default=(0.75, 0.5, 1.0),
                        help="the first is also used for words-incr")
    parser.add_argument("--floor-batches", type=_ints, default=None,
                        help="default: per model, see FLOOR_BATCHES")
    parser.add_argument("--captum", type=_ints, default=None,
                        help="default: per model, see CAPTUM_BEST_OF")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu (default; only with --threads 1) or wall")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--float64", action="store_true",
                        help="also measure both float32 maps against a float64 plain map")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    info["allocator_pinned"] = pin_allocator()
    print(f"machine: {info}", flush=True)
    use_cpu = args.clock == "cpu" and args.threads == 1
    results = []
    for m in (m.strip() for m in args.models.split(",")):
        results.append(benchmark_model(
            m, grid=args.grid, repeats=args.repeats, thresholds=args.thresholds,
            floor_batches=args.floor_batches or FLOOR_BATCHES[m],
            captum=args.captum or CAPTUM_BEST_OF[m], memory=not args.no_memory,
            use_cpu=use_cpu, float64=args.float64))
    info["load_average_after"] = os.getloadavg()
    print(f"\nload average after: {info['load_average_after']}\n")
    for r in results:
        print((report(r) if "medians_s" in r else json.dumps(r)) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "argv": sys.argv, "results": results},
                                        indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
