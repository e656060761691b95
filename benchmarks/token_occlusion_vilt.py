"""Token occlusion vs pixel occlusion on ViLT (issue 22): time and agreement of the maps.

Models: ``b32``, a random ViLT-B/32-sized VQA model (``vilt_b32.py``: ``ViltConfig()``
defaults, 3,129 answers, 384 x 384, 12 x 12 patch tokens); ``tiny64`` and ``tiny384``,
the tests' 2-layer ViLT (``tests/hf_toys.py``: hidden 32, 16-px patches, weights drawn
wide so answers change with the image) at 64 x 64 (4 x 4 tokens) and 384 x 384 (24 x 24
tokens). Input: the first easy-VQA test image (resized to the model's size) and its
question. Each model explains the predicted answer at a ``grid x grid`` lattice (default
16) twice per round, once by :class:`TokenOcclusion` (the image embedded once, each
cell's patch tokens left out of attention) and once by :class:`Occlusion` (each cell's
pixels set to the ImageNet mean, image cells only, batch 32 like the token path), the
order alternating between rounds. Both count ``1 + grid**2`` model inputs.

Clocks: this process's CPU time (``time.process_time``; with ``--threads 1`` the honest
clock on a shared machine) and wall time, per run; medians over the rounds. Agreement:
Spearman rank correlation over all cells and the overlap of the 10 highest cells. It
also splits one batch of 32 inputs into the processor, the patch embedding
and the transformer with its head (CPU time, one pass).

Run ``PYTHONPATH=src:tests:benchmarks python benchmarks/token_occlusion_vilt.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

import vilt_b32  # this folder (run as a script)
from blackbox_vqa.adapters.hf.vqa import HfAdapter
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.explainers.token_occlusion import TokenOcclusion

MODELS = ("b32", "tiny64", "tiny384")
BATCH = 32


def load(name: str, folder: Path) -> tuple[HfAdapter, np.ndarray, str]:
    """The adapter for ``name`` (built in ``folder`` unless a ``config.json`` is there),
    its image and the question."""
    if name == "b32":
        if not (folder / "config.json").exists():
            vilt_b32.build(folder)
        image, question = vilt_b32.easyvqa_example()
    else:
        from hf_toys import build_vilt  # tests/ on sys.path

        size = int(name.removeprefix("tiny"))
        if not (folder / "config.json").exists():
            build_vilt(folder, image_size=size)
        image, question = vilt_b32.easyvqa_example(size)
    return HfAdapter.from_pretrained(folder, device="cpu"), image, question


def clocked(run: Callable[[], Any]) -> tuple[float, float, Any]:
    """``(cpu_s, wall_s, result)`` of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = run()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Share of the ``k`` highest cells of ``a`` that are among the ``k`` highest of ``b``."""
    top_a = set(np.argsort(-a.ravel(), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b.ravel(), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def split_batch(model: HfAdapter, image: np.ndarray, question: str) -> dict[str, float]:
    """CPU seconds of one batch of ``BATCH`` inputs: processor (pixels and text), patch
    embedding (``visual_embed``), transformer and head given the embedded tokens."""
    module: Any = model.module
    images = [image.astype(np.float32)] * BATCH
    with torch.inference_mode():
        cpu = time.process_time()
        pixels = model.pixel_inputs(images)
        text = model.text_inputs([question] * BATCH)
        processor_s = time.process_time() - cpu
        mask = pixels.get("pixel_mask")
        if mask is None:
            mask = torch.ones((BATCH, *pixels["pixel_values"].shape[2:]), dtype=torch.long)
        cpu = time.process_time()
        tokens, token_mask, _ = module.vilt.embeddings.visual_embed(
            pixels["pixel_values"], mask, max_image_length=-1)
        embed_s = time.process_time() - cpu
        cpu = time.process_time()
        # given image_embeds, ViLT takes the token mask [B, 1 + tokens] as pixel_mask
        module(**text, image_embeds=tokens, pixel_mask=token_mask)
        transformer_s = time.process_time() - cpu
    return {"processor_s": round(processor_s, 3), "patch_embedding_s": round(embed_s, 3),
            "transformer_and_head_s": round(transformer_s, 3)}


def measure(name: str, folder: Path, grid: int, rounds: int) -> dict[str, Any]:
    """Token vs pixel occlusion on one model, ``rounds`` interleaved rounds."""
    model, image, question = load(name, folder)
    methods: dict[str, Callable[[], Any]] = {
        "token": lambda: TokenOcclusion(model, grid=grid).explain(image, question),
        "pixel": lambda: Occlusion(model, grid=grid, words=False,
                                   batch_size=BATCH).explain(image, question),
    }
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    wall: dict[str, list[float]] = {k: [] for k in methods}
    maps: dict[str, Any] = {}
    for round_ in range(rounds):
        order = ("token", "pixel") if round_ % 2 == 0 else ("pixel", "token")
        for method in order:
            cpu_s, wall_s, result = clocked(methods[method])
            cpu[method].append(round(cpu_s, 3))
            wall[method].append(round(wall_s, 3))
            maps[method] = result
            print(f"{name} round {round_} {method}: cpu {cpu_s:.2f} s, wall {wall_s:.2f} s",
                  file=sys.stderr, flush=True)
    token, pixel = maps["token"], maps["pixel"]
    rows, cols = model.image_token_grid(image)
    record: dict[str, Any] = {
        "model": name,
        "parameters_m": round(sum(p.numel() for p in model.module.parameters()) / 1e6, 2),
        "image": list(image.shape[:2]), "token_grid": [rows, cols], "question": question,
        "inputs_per_map": 1 + grid**2,
        "answer": {"token": token.answer, "pixel": pixel.answer},
        "probability": round(token.probability, 6),
        "cpu_s": cpu, "wall_s": wall,
        "cpu_median_s": {k: statistics.median(v) for k, v in cpu.items()},
        "wall_median_s": {k: statistics.median(v) for k, v in wall.items()},
        "spearman": float(spearmanr(token.image_map.ravel(),
                                    pixel.image_map.ravel()).statistic),
        "top10_overlap": top_overlap(token.image_map, pixel.image_map),
        "map_range": {"token": [float(token.image_map.min()), float(token.image_map.max())],
                      "pixel": [float(pixel.image_map.min()), float(pixel.image_map.max())]},
        "flips": {"token": token.flips, "pixel": pixel.image_flips},
        "pixel_evaluations": pixel.evaluations,
    }
    medians = record["cpu_median_s"]
    record["cpu_ratio_token_over_pixel"] = round(medians["token"] / medians["pixel"], 3)
    record["one_batch_of_32_cpu"] = split_batch(model, image, question)
    print(json.dumps(record), file=sys.stderr, flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the models are built (reused if already there)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}")
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        records = [measure(n, workdir / n, args.grid, args.rounds) for n in names]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(), "torch": torch.__version__,
        "threads": args.threads, "grid": args.grid, "rounds": args.rounds,
        "clock": "time.process_time (this process's CPU time); wall time alongside",
        "loadavg_start": load_start,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "models": records,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
