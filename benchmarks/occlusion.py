"""Occlusion benchmark (issue 2): our explainer against the batched-forward floor and Captum.

For each model (see ``models.py``) one full explanation -- every cell of a ``grid x grid``
lattice plus every word of the question, ``1 + grid**2 + words`` evaluations -- is timed,
side by side in one process and with one torch thread count, as:

- ``ours``: ``Occlusion(adapter, grid=..., batch_size="auto").explain(image, question)``
  through the ``TorchAdapter`` (input validation, mask building, preprocessing,
  tokenisation, batching, score checks: everything a user pays for);
- ``floor@B``: ``module(image_tensor, tokens)`` alone over the same perturbed inputs,
  pre-built as preprocessed tensors (built untimed), in slices of ``B``, under
  ``torch.inference_mode``; the floor is the best ``B`` (lowest median);
- ``captum@K``: Captum's ``Occlusion`` on the same module (softmax of the logits, target =
  our predicted answer) over the preprocessed image tensor, sliding windows equal to the
  cells, the same baseline colour in normalised space, ``perturbations_per_eval=K``; plus
  the same word drops, which Captum has no notion of, run the way Captum would: pre-built
  token tensors (tokenised untimed), ``K`` per forward call (one per call for ``K=1``).

Each repeat runs every method once, in an order shuffled per repeat (seeded); figures are
medians over repeats, every ratio is between medians of the same run, and beside it is
the median of the per-repeat ratios (steadier when the machine's load drifts). The minor
page faults of each timed run are counted too (fresh memory pages: glibc hands large
freed blocks back to the kernel, and a forward pass that maps its activations afresh
each batch pays for it; see ``pin_allocator``). Peak memory is
measured afterwards, one extra untimed run per method: the peak resident set size above
the level before the run (``VmHWM`` reset through ``/proc/self/clear_refs``, after
``malloc_trim``; this includes torch's allocations) and the peak of Python/NumPy
allocations (``tracemalloc``; torch tensors are not seen by it).

Run ``python benchmarks/occlusion.py --help``; ``--quick`` is a short smoke run (grid 8,
one repeat, fewer batch sizes) for development, not for the record.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from blackbox_vqa.explain import explain
from blackbox_vqa.explainers.masks import (
    IMAGENET_MEAN_RGB,
    baseline_image,
    grid_boxes,
    occluded_batch,
)
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.text import drop_word, split_words
from models import MODEL_NAMES, BenchModel, build_model  # this folder (run as a script)

FLOOR_BATCHES = (1, 4, 8, 16, 32, 64, 128, 256)
CAPTUM_BEST_OF = (16, 64, 256)
GOAL_FLOOR = 1.15
GOAL_CAPTUM_DEFAULT = 2.0
GOAL_CAPTUM_BEST = 1.0


@dataclass
class Workload:
    """One explanation's perturbed inputs, pre-built for the floor and for Captum."""

    case: BenchModel
    grid: int
    module: torch.nn.Module
    answer_index: int
    images: torch.Tensor  # [N, 3, H, W] preprocessed: original, cells, then word drops
    tokens: torch.Tensor  # [N, T]
    image: torch.Tensor  # [1, 3, H, W] preprocessed original
    word_tokens: list[torch.Tensor]  # one [1, T_i] per dropped word
    baseline: torch.Tensor  # [1, 3, 1, 1] the fill colour, preprocessed
    cell: tuple[int, int]
    n_words: int
    word_chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.images.shape[0])

    def word_batches(self, per_eval: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The word drops as ``(images [k,3,H,W], tokens [k,T])`` chunks of ``per_eval``."""
        if per_eval not in self.word_chunks:
            chunks = []
            for start in range(0, self.n_words, per_eval):
                part = self.word_tokens[start : start + per_eval]
                tokens = torch.zeros((len(part), max(int(t.shape[1]) for t in part)),
                                     dtype=torch.long)
                for row, tok in enumerate(part):
                    tokens[row, : tok.shape[1]] = tok[0]
                images = self.image.expand(len(part), -1, -1, -1).contiguous()
                chunks.append((images, tokens))
            self.word_chunks[per_eval] = chunks
        return self.word_chunks[per_eval]


@dataclass
class Timings:
    """Seconds per repeat for each method label."""

    runs: dict[str, list[float]] = field(default_factory=dict)
    faults: dict[str, list[int]] = field(default_factory=dict)

    def add(self, label: str, seconds: float, faults: int) -> None:
        self.runs.setdefault(label, []).append(seconds)
        self.faults.setdefault(label, []).append(faults)

    def median(self, label: str) -> float:
        return statistics.median(self.runs[label])


def build_workload(case: BenchModel, grid: int) -> Workload:
    """Pre-build every perturbed input of one explanation as module input tensors."""
    adapter = case.adapter
    height, width = case.image.shape[:2]
    if height % grid or width % grid:
        raise SystemExit(f"{case.name}: {height}x{width} is not divisible by grid {grid}")
    if (height, width) != adapter.preprocessing.image_size:
        raise SystemExit(f"{case.name}: the image must be at the model's input size")
    pixels = case.image.astype(np.float32)
    fill = baseline_image(pixels, "imagenet-mean", blur_sigma=1.0)
    boxes = grid_boxes(height, width, grid)
    words = split_words(case.question)
    dropped = [drop_word(case.question, i) for i in range(len(words))]
    perturbed: list[NDArray[np.float32]] = [pixels, *occluded_batch(pixels, fill, boxes)]
    perturbed += [pixels] * len(words)
    questions = [case.question] * (1 + len(boxes)) + dropped
    images, tokens = adapter.inputs(perturbed, questions)
    image, question_tokens = adapter.inputs([pixels], [case.question])
    baseline, _ = adapter.inputs([np.full((1, 1, 3), IMAGENET_MEAN_RGB, np.float32)], ["x"])
    module = adapter.module.eval()
    with torch.inference_mode():
        answer_index = int(module(image, question_tokens).argmax(dim=1)[0])
    word_tokens = [adapter.inputs([pixels], [q])[1] for q in dropped]
    return Workload(
        case=case, grid=grid, module=module, answer_index=answer_index,
        images=images, tokens=tokens, image=image, word_tokens=word_tokens,
        baseline=baseline.clone(), cell=(height // grid, width // grid), n_words=len(words),
    )


# --- the methods -------------------------------------------------------------------------


def run_ours(work: Workload, batch_size: int | str) -> Any:
    explainer = Occlusion(work.case.adapter, grid=work.grid, batch_size=batch_size)
    return explainer.explain(work.case.image, work.case.question)


def run_api(work: Workload, batch_size: int | str) -> Any:
    """The library call every command makes (``blackbox_vqa.explain.explain``)."""
    return explain(work.case.adapter, work.case.image, work.case.question, grid=work.grid,
                   batch_size=batch_size)


def run_floor(work: Workload, batch: int) -> None:
    with torch.inference_mode():
        for start in range(0, work.total, batch):
            work.module(work.images[start : start + batch], work.tokens[start : start + batch])


def _scores(module: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def forward(image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.softmax(module(image, tokens), dim=-1)

    return forward


def run_captum(work: Workload, per_eval: int) -> torch.Tensor:
    from captum.attr import Occlusion as CaptumOcclusion

    forward = _scores(work.module)
    window = (3, *work.cell)
    attribution = CaptumOcclusion(forward).attribute(
        work.image,
        sliding_window_shapes=window,
        strides=window,
        baselines=work.baseline,
        target=work.answer_index,
        additional_forward_args=(work.tokens[:1],),
        perturbations_per_eval=per_eval,
    )
    with torch.no_grad():  # the word drops, as Captum would run them: per_eval per call
        for images, tokens in work.word_batches(per_eval):
            forward(images, tokens)[:, work.answer_index]
    return attribution  # type: ignore[no-any-return]


# --- measuring ---------------------------------------------------------------------------


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds ``fn()`` took on ``clock``."""
    start = clock()
    fn()
    return clock() - start


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh memory pages touched)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def pin_allocator() -> bool:
    """Fix glibc's allocator thresholds so no method inherits another's heap state.

    glibc maps blocks at or above a dynamic threshold afresh and gives heap memory back
    to the kernel once more than twice that is free at its top, so a method timed right
    after one with huge batches (``floor@256``, ``captum@256``) page-faults on memory the
    method before it released. With a fixed 32 MiB mmap threshold (the most glibc
    allows) and a 1 GiB trim threshold, every method sees the same steady state. That
    state is friendlier than a user's process: ``TorchAdapter`` only raises the mmap
    threshold, so there glibc still trims its heap, and a ResNet-18-sized model at
    224 x 224 page-faults from batch 8 on (benchmarks/BENCHMARKS.md, "Torch's batch
    size"). Returns whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 2**30),
                (_M_TOP_PAD, 64 * 2**20))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(out: dict[str, float]) -> Iterator[None]:
    """Fill ``out`` with ``rss_mib`` (peak RSS above the start) and ``py_mib`` (tracemalloc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset = True
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        reset = False
    before = _proc_status_kb("VmRSS")
    tracemalloc.start()
    try:
        yield
    finally:
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak = _proc_status_kb("VmHWM")
        out["py_mib"] = py_peak / 2**20
        if reset and before is not None and peak is not None:
            out["rss_mib"] = (peak - before) / 1024
        else:
            out["rss_mib"] = float("nan")


def benchmark_model(
    name: str, *, grid: int, repeats: int, clock: str, floor_batches: tuple[int, ...],
    captum_best_of: tuple[int, ...], ours_batches: tuple[int | str, ...], memory: bool,
) -> dict[str, Any]:
    case = build_model(name)
    work = build_workload(case, grid)
    print(f"\n== {name}: {case.description}", flush=True)
    print(f"   question {case.question!r}: {grid}x{grid} cells + {work.n_words} words = "
          f"{work.total} evaluations", flush=True)

    methods: dict[str, Callable[[], Any]] = {}
    for batch in ours_batches:
        methods[f"ours@{batch}"] = functools.partial(run_ours, work, batch)
    methods[f"api@{ours_batches[0]}"] = functools.partial(run_api, work, ours_batches[0])
    for size in floor_batches:
        methods[f"floor@{size}"] = functools.partial(run_floor, work, size)
    for per_eval in (1, *captum_best_of):
        methods[f"captum@{per_eval}"] = functools.partial(run_captum, work, per_eval)

    result = run_ours(work, ours_batches[0])  # warm-up, and the equality check
    auto_batch = result.batch_size
    attribution = run_captum(work, captum_best_of[0])
    for fn in methods.values():
        fn()
    ours_pixels = np.kron(result.image_map, np.ones(work.cell))
    captum_diff = float(np.abs(attribution[0].numpy() - ours_pixels[None]).max())

    timings = Timings()
    for rep in range(repeats):
        order = list(methods)
        random.Random(rep).shuffle(order)  # no method always follows the same one
        for label in order:
            before = minor_faults()
            seconds = timed(methods[label], CLOCKS[clock])
            timings.add(label, seconds, minor_faults() - before)
        print(f"   repeat {rep + 1}/{repeats}: " + ", ".join(
            f"{label} {timings.runs[label][-1]:.3f}" for label in methods), flush=True)

    medians = {label: timings.median(label) for label in methods}
    ours_label = f"ours@{ours_batches[0]}"
    floor_label = min((f"floor@{b}" for b in floor_batches), key=medians.__getitem__)
    best_label = min((f"captum@{k}" for k in captum_best_of), key=medians.__getitem__)
    ours = medians[ours_label]
    ratios = {
        "ours/floor": ours / medians[floor_label],
        "captum-default/ours": medians["captum@1"] / ours,
        "captum-best/ours": medians[best_label] / ours,
        "api/ours": medians[f"api@{ours_batches[0]}"] / ours,
    }
    runs = timings.runs
    paired = {  # the median over repeats of each repeat's own ratio
        "ours/floor": _paired(runs[ours_label], runs[floor_label]),
        "captum-default/ours": _paired(runs["captum@1"], runs[ours_label]),
        "captum-best/ours": _paired(runs[best_label], runs[ours_label]),
        "api/ours": _paired(runs[f"api@{ours_batches[0]}"], runs[ours_label]),
    }
    memory_mib: dict[str, dict[str, float]] = {}
    if memory:
        for label in (ours_label, floor_label, "captum@1", best_label):
            memory_mib[label] = {}
            with peak_memory(memory_mib[label]):
                methods[label]()
    return {
        "model": name, "description": case.description, "trained": case.trained,
        "clock": clock, "repeats": repeats, "grid": grid, "words": work.n_words,
        "evaluations": work.total,
        "auto_batch_size": auto_batch, "ours": ours_label, "floor": floor_label,
        "captum_best": best_label, "medians_s": medians, "runs_s": timings.runs,
        "minor_faults": {label: int(statistics.median(v)) for label, v in timings.faults.items()},
        "ratios": ratios, "paired_ratios": paired, "memory_mib": memory_mib,
        "captum_max_abs_diff": captum_diff,
    }


def _paired(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def report(result: dict[str, Any]) -> str:
    med, ratios = result["medians_s"], result["ratios"]
    lines = [
        f"### {result['model']}: {result['description']}",
        "",
        f"{result['evaluations']} evaluations ({result['grid']}x{result['grid']} cells + "
        f"{result['words']} words); our auto batch size: {result['auto_batch_size']}; "
        f"max |ours - Captum| per pixel: {result['captum_max_abs_diff']:.2e}; "
        f"{result['clock']} clock, {result['repeats']} repeats",
        "",
        "| method | median s | min s | page faults | peak RSS MiB | peak tracemalloc MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    mem = result["memory_mib"]
    for label, seconds in med.items():
        marks = []
        if label == result["floor"]:
            marks.append("floor")
        if label == result["captum_best"]:
            marks.append("Captum best")
        if label == "captum@1":
            marks.append("Captum default")
        shown = f"{label} ({', '.join(marks)})" if marks else label
        rss = f"{mem[label]['rss_mib']:.0f}" if label in mem else ""
        py = f"{mem[label]['py_mib']:.1f}" if label in mem else ""
        fastest = min(result["runs_s"][label])
        faults = result["minor_faults"][label]
        lines.append(f"| {shown} | {seconds:.3f} | {fastest:.3f} | {faults} | {rss} | {py} |")
    goals = [
        ("ours/floor", ratios["ours/floor"], f"<= {GOAL_FLOOR}",
         ratios["ours/floor"] <= GOAL_FLOOR),
        ("captum-best/ours", ratios["captum-best/ours"], f">= {GOAL_CAPTUM_BEST}",
         ratios["captum-best/ours"] >= GOAL_CAPTUM_BEST),
        ("api/ours", ratios["api/ours"], "(the library call; no goal)", None),
        ("captum-default/ours", ratios["captum-default/ours"],
         f">= {GOAL_CAPTUM_DEFAULT}" if result["model"] == "reference" else "(no goal)",
         ratios["captum-default/ours"] >= GOAL_CAPTUM_DEFAULT
         if result["model"] == "reference" else None),
    ]
    lines += ["", "| ratio | of medians | median of per-repeat | goal | met |",
              "|---|---:|---:|---|---|"]
    for label, value, goal, met in goals:
        verdict = "" if met is None else ("yes" if met else "**no**")
        paired = result["paired_ratios"][label]
        lines.append(f"| {label} | {value:.2f} | {paired:.2f} | {goal} | {verdict} |")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _batch(text: str) -> int | str:
    return "auto" if text == "auto" else _ints(text)[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES),
                        help=f"comma-separated, from {', '.join(MODEL_NAMES)} (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per model (default: 7 reference, 3 resnet18)")
    parser.add_argument("--grid", type=int, default=16, help="cells per side (default 16)")
    parser.add_argument("--floor-batches", type=_ints, default=FLOOR_BATCHES,
                        help="batch sizes tried for the floor")
    parser.add_argument("--captum-best-of", type=_ints, default=CAPTUM_BEST_OF,
                        help="perturbations_per_eval values Captum's best is taken from")
    parser.add_argument("--ours-batch", type=_batch, action="append", default=None,
                        help="our batch size, 'auto' (default) or N; repeat to time several "
                             "(the first one is the one compared)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall time (default), or this process's CPU time: steadier on a "
                             "busy machine with --threads 1, meaningless with more threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument("--no-pin-allocator", dest="pin_allocator", action="store_false",
                        help="leave glibc's thresholds dynamic (see pin_allocator)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: grid 8, 1 repeat, fewer batch sizes")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid, args.repeats = 8, args.repeats or 1
        args.floor_batches, args.captum_best_of = (4, 16, 64), (16, 64)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.grid < 1:
        parser.error(f"--grid must be >= 1, got {args.grid}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_NAMES)}")
    args.ours_batch = tuple(args.ours_batch or ("auto",))
    return args


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pinned = pin_allocator() if args.pin_allocator else False
    info = machine()
    info["allocator_pinned"] = pinned
    print(f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, "
          f"{info['threads']} thread(s); glibc allocator pinned: {pinned}; "
          f"load average {info['load_average']}", flush=True)
    results = []
    for name in args.models:
        repeats = args.repeats or (7 if name == "reference" else 3)
        results.append(benchmark_model(
            name, grid=args.grid, repeats=repeats, clock=args.clock,
            floor_batches=args.floor_batches,
            captum_best_of=args.captum_best_of, ours_batches=args.ours_batch,
            memory=not args.no_memory,
        ))
    info["load_average_after"] = os.getloadavg()
    print(f"\nload average after: {info['load_average_after']}\n")
    for result in results:
        print(report(result) + "\n")
    if args.json is not None:
        payload = {"machine": info, "argv": sys.argv, "results": results}
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
