"""Occlusion on a ViLT-B/32-sized random model (384 x 384): PyTorch vs its ONNX export.

Builds ``ViltForQuestionAnswering`` with ViLT-B/32's sizes (``vilt_b32.py``: hidden 768,
12 layers, 32-px patches, 3,129 answers; random weights, the easy-VQA words as the
vocabulary), saves it with ``save_pretrained``, exports it with ``export_hf_model``
(self-checked), then times one occlusion explanation (``grid x grid`` cells plus every
word) of the first easy-VQA test image (resized to 384 x 384) and its question through
``HfAdapter`` and through ``HfOnnxAdapter``, alternating which goes first on each repeat.
Each run is timed by two clocks: this process's CPU time (``time.process_time``; the one
to trust on a shared machine with ``--threads 1``, which also sets ONNX Runtime's
intra-op threads to 1) and wall time. Medians; the ratios are ONNX / PyTorch. Also prints
the largest difference between the two maps.

Run ``PYTHONPATH=src:benchmarks python benchmarks/hf_onnx_vs_torch.py --help``.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blackbox_vqa.adapters.hf.onnx import HfOnnxAdapter
from blackbox_vqa.adapters.hf.vqa import HfAdapter
from blackbox_vqa.explainers.occlusion import Occlusion, OcclusionResult
from blackbox_vqa.exporters.hf_onnx import export_hf_model
from vilt_b32 import build, easyvqa_example  # this folder (run as a script)


def _time(
    model: Any, image: Any, question: str, grid: int, batch: int
) -> tuple[float, float, OcclusionResult]:
    """``(cpu_s, wall_s, result)`` of one occlusion explanation."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = Occlusion(model, grid=grid, batch_size=batch).explain(image, question)
    return time.process_time() - cpu, time.perf_counter() - wall, result


def _loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads and ONNX Runtime intra-op threads")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the model and its export go (reused if already there)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image, question = easyvqa_example()
    load_start = _loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        folder = workdir / "b32"
        if not (folder / "config.json").exists():
            build(folder)
        torch_model = HfAdapter.from_pretrained(folder, device="cpu")
        started = time.perf_counter()
        export = export_hf_model(torch_model, workdir / "b32-onnx", force=True)
        export_s = time.perf_counter() - started
        onnx_model = HfOnnxAdapter(export.onnx_path, threads=args.threads)
        cpu: dict[str, list[float]] = {"torch": [], "onnx": []}
        wall: dict[str, list[float]] = {"torch": [], "onnx": []}
        maps: dict[str, OcclusionResult] = {}
        for repeat in range(args.repeats):
            order = ("torch", "onnx") if repeat % 2 == 0 else ("onnx", "torch")
            for name in order:
                model = torch_model if name == "torch" else onnx_model
                cpu_s, wall_s, result = _time(model, image, question, args.grid, args.batch)
                cpu[name].append(round(cpu_s, 2))
                wall[name].append(round(wall_s, 2))
                maps[name] = result
                print(f"repeat {repeat} {name}: cpu {cpu_s:.1f} s, wall {wall_s:.1f} s",
                      file=sys.stderr, flush=True)
        record: dict[str, Any] = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "loadavg_start": load_start, "loadavg_end": _loadavg(),
            "clock": "time.process_time (CPU time) and time.perf_counter (wall), per run",
            "grid": args.grid, "threads": args.threads, "onnx_intra_op_threads": args.threads,
            "batch": args.batch, "question": question,
            "evaluations": maps["torch"].evaluations,
            "parameters_m": round(sum(p.numel() for p in torch_model.module.parameters())
                                  / 1e6, 1),
            "export_s": round(export_s, 1),
            "onnx_mb": round(export.onnx_path.stat().st_size / 2**20, 1),
            "export_onnx_max_diff": export.onnx_max_diff,
            "export_patch_path_max_diff": export.patch_path_max_diff,
            "cpu_median_s": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
            "wall_median_s": {k: round(statistics.median(v), 3) for k, v in wall.items()},
            "cpu_s": cpu, "wall_s": wall,
            "answer": {k: m.answer for k, m in maps.items()},
            "map_max_diff": float(np.abs(maps["torch"].image_map
                                         - maps["onnx"].image_map).max()),
            "word_map_max_diff": float(np.abs(maps["torch"].word_map
                                              - maps["onnx"].word_map).max()),
            "map_range": [float(maps["torch"].image_map.min()),
                          float(maps["torch"].image_map.max())],
        }
        for clock in ("cpu", "wall"):
            medians = record[f"{clock}_median_s"]
            record[f"{clock}_ratio_onnx_over_torch"] = round(medians["onnx"] / medians["torch"],
                                                             3)
    json.dump(record, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
