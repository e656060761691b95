"""Token occlusion vs pixel occlusion on a generative VLM (issue 22): one 8 x 8 image map
each, side by side in one process, on two shapes.

- ``token``: ``TokenOcclusion`` (the vision tower once, every cell's image tokens left out
  of attention; the original's key/value cache reused up to each batch's first ablated
  position);
- ``token-no-kv``: the same with the adapter's reuse off (every row runs the whole
  language model; the vision tower still once);
- ``pixel``: ``Occlusion(words=False)`` (a grey cell pasted into the image: one
  vision-tower pass per cell, the prompt prefix's cache reused as the adapter does).

Shapes: ``smolvlm`` (benchmarks/generative.py's Idefics3 model with SmolVLM-256M's layer
sizes, 512 px, one tile, 64 image tokens, random weights, a 3-token answer) and ``tiny``
(tests/genvlm_toys.py's LLaVA). Scores are log-probabilities. Every run is timed by this
process's CPU time (``time.process_time``) with one torch thread; one warm-up per run
kind (``--warmup``), then the runs are interleaved, one of each per round, and the median
of ``--rounds`` rounds is reported, with the CPU time spent in the vision tower
(``get_image_features``, projector included) and the rest (language model, processor,
bookkeeping). Spearman's rank correlation is between the token and the pixel map.

usage: PYTHONPATH=src:tests python benchmarks/token_occlusion.py [--shapes smolvlm,tiny]
       [--rounds 3] [--pixel-grid 8] [--warmup token,token-no-kv,pixel]
       [--token-batches 8,1] [--no-pixel]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.explainers.token_occlusion import TokenOcclusion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generative import smolvlm_256m_shaped, tiny_llava

QUESTION = "what color is the shape in the image"
GRID = 8
CLOCK = time.process_time


def picture(size: int) -> np.ndarray:
    """A ``size x size`` RGB image: a smooth gradient with a red square and a blue disc."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([200 * x, 180 * y, 120 + 60 * x * y], axis=-1)
    image[size // 8: size // 2, size // 8: size // 2] = (220, 30, 30)
    disc = (x - 0.7) ** 2 + (y - 0.7) ** 2 < 0.04
    image[disc] = (30, 40, 220)
    return np.asarray(np.clip(image, 0, 255), dtype=np.uint8)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (flattened), ties averaged."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)


def timed(adapter: GenerativeAdapter, fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """``fn()`` and its CPU seconds: total, in the vision tower, and the rest."""
    base = adapter.module.model
    inner = base.get_image_features
    spent = {"vision": 0.0, "vision_calls": 0}

    def features(*args: Any, **kwargs: Any) -> Any:
        started = CLOCK()
        out = inner(*args, **kwargs)
        spent["vision"] += CLOCK() - started
        spent["vision_calls"] += 1
        return out

    base.get_image_features = features
    try:
        started = CLOCK()
        result = fn()
        total = CLOCK() - started
    finally:
        del base.get_image_features
    return result, {"total_s": total, "vision_s": spent["vision"],
                    "rest_s": total - spent["vision"], "vision_calls": spent["vision_calls"]}


def run_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    adapter = smolvlm_256m_shaped("cpu") if shape == "smolvlm" else tiny_llava("cpu")
    size = 512 if shape == "smolvlm" else 64
    pixels = picture(size).astype(np.float32)
    adapter.prepare(pixels, QUESTION)  # the tiny LLaVA's own answer; SmolVLM's is fixed
    answer = adapter.answers[0]

    def token(kv: bool, batch: int | None = None) -> Any:
        adapter.reuse.enabled, size = kv, adapter.batch_size
        adapter.batch_size = batch or size
        try:
            return TokenOcclusion(adapter, grid=GRID, score="log-probability").explain(
                pixels, QUESTION, answer=answer)
        finally:
            adapter.reuse.enabled, adapter.batch_size = True, size

    pixel_grid = args.pixel_grid
    runs: dict[str, tuple[GenerativeAdapter, Callable[[], Any]]] = {
        "token": (adapter, lambda: token(True)),
        "token-no-kv": (adapter, lambda: token(False)),
        "pixel": (adapter, lambda: Occlusion(adapter, grid=pixel_grid, words=False,
                                             score="log-probability")
                  .explain(pixels, QUESTION, answer=answer)),
    }
    def batched(size: int) -> Callable[[], Any]:
        return lambda: token(True, size)

    for batch in [int(b) for b in args.token_batches.split(",") if b]:
        runs[f"token-batch{batch}"] = (adapter, batched(batch))
    if args.no_pixel:
        del runs["pixel"]
    for name in args.warmup.split(","):
        if name in runs:
            _, spent = timed(*runs[name])
            print(shape, "warm-up", name, round(spent["total_s"], 2), file=sys.stderr,
                  flush=True)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    maps: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, (model, fn) in runs.items():
            result, spent = timed(model, fn)
            times[name].append(spent)
            maps[name] = np.asarray(result.image_map)
            print(shape, name, {k: round(v, 3) for k, v in spent.items()}, file=sys.stderr,
                  flush=True)
    medians: dict[str, dict[str, Any]] = {
        name: {key: round(statistics.median(t[key] for t in found), 3) for key in found[0]}
        | {"all_s": [round(t["total_s"], 2) for t in found]}
        for name, found in times.items()}
    found = {"shape": shape, "grid": GRID, "rounds": args.rounds, "batch": adapter.batch_size,
             "answer_tokens": len(adapter.answer_ids), "medians": medians,
             "speedup_kv_reuse": round(medians["token-no-kv"]["total_s"]
                                       / medians["token"]["total_s"], 2),
             "token_maps_equal": float(np.abs(maps["token"] - maps["token-no-kv"]).max())}
    if "pixel" not in maps:
        return found
    pixel_map = maps["pixel"]
    token_map = maps["token"]
    if pixel_map.shape != token_map.shape:  # a coarser pixel grid: token map pooled to it
        k = GRID // pixel_map.shape[0]
        token_map = token_map.reshape(pixel_map.shape[0], k, pixel_map.shape[1], k).mean(
            axis=(1, 3))
    return found | {
        "pixel_grid": pixel_grid,
        "speedup_token_vs_pixel": round(medians["pixel"]["total_s"]
                                        / medians["token"]["total_s"], 2),
        "spearman_token_vs_pixel": round(spearman(token_map, pixel_map), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="smolvlm,tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pixel-grid", type=int, default=GRID)
    parser.add_argument("--warmup", default="token,token-no-kv,pixel",
                        help="run kinds warmed up once before the rounds")
    parser.add_argument("--token-batches", default="",
                        help="extra token runs at these batch sizes (comma-separated)")
    parser.add_argument("--no-pixel", action="store_true", help="token runs only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = Path("/proc/loadavg").read_text().split()[:3]
    results = [run_shape(shape, args) for shape in args.shapes.split(",")]
    print(json.dumps({
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "threads": 1, "clock": "process_time",
        "load_average_start": load,
        "load_average_end": Path("/proc/loadavg").read_text().split()[:3],
        "torch": torch.__version__, "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
