"""Occlusion on a ViLT-B/32-sized random model (384 x 384): PyTorch vs its ONNX export.

Builds ``ViltForQuestionAnswering`` with ViLT-B/32's sizes (hidden 768, 12 layers, 32-px
patches, 3,129 answers; random weights, a small word vocabulary written here), saves it
with ``save_pretrained``, exports it with ``export_hf_model`` (self-checked), then times
one occlusion explanation (``grid x grid`` cells plus every word) through ``HfAdapter``
and through ``HfOnnxAdapter``, alternating which goes first on each repeat. Medians; the
ratio is ONNX / PyTorch. Also prints the largest difference between the two maps.

Run ``python benchmarks/hf_onnx_vs_torch.py --help``.
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
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.exporters.hf_onnx import export_hf_model

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "is", "the",
         "shape", "how", "many", "?", "man", "holding"]
QUESTION = "what is the man holding?"


def build(folder: Path) -> Path:
    """A random ViLT-B/32-sized VQA model and its processor, saved in ``folder``."""
    from transformers import (
        BertTokenizerFast,
        ViltConfig,
        ViltForQuestionAnswering,
        ViltImageProcessorPil,
        ViltProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    labels = {i: f"answer{i}" for i in range(3129)}
    config = ViltConfig(id2label=labels, label2id={v: k for k, v in labels.items()},
                        max_image_length=-1)
    torch.manual_seed(0)
    model = ViltForQuestionAnswering(config).eval()
    processor = ViltProcessor(
        image_processor=ViltImageProcessorPil(size={"shortest_edge": 384}),
        tokenizer=BertTokenizerFast(str(folder / "vocab.txt")),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _time(model: Any, image: Any, grid: int, batch: int) -> tuple[float, Any]:
    started = time.perf_counter()
    result = Occlusion(model, grid=grid, batch_size=batch).explain(image, QUESTION)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = np.random.default_rng(0).integers(0, 256, size=(384, 384, 3)).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "vilt-b32")
        torch_model = HfAdapter.from_pretrained(folder, device="cpu")
        started = time.perf_counter()
        export = export_hf_model(torch_model, Path(tmp) / "onnx")
        export_s = time.perf_counter() - started
        onnx_model = HfOnnxAdapter(export.onnx_path, threads=args.threads)
        times: dict[str, list[float]] = {"torch": [], "onnx": []}
        maps: dict[str, Any] = {}
        for repeat in range(args.repeats):
            order = ("torch", "onnx") if repeat % 2 == 0 else ("onnx", "torch")
            for name in order:
                model = torch_model if name == "torch" else onnx_model
                seconds, result = _time(model, image, args.grid, args.batch)
                times[name].append(seconds)
                maps[name] = result
        record = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_average": os.getloadavg()[0],
            "grid": args.grid, "threads": args.threads, "batch": args.batch,
            "evaluations": 1 + args.grid**2 + len(QUESTION.split()),
            "parameters_m": round(sum(p.numel() for p in torch_model.module.parameters())
                                  / 1e6, 1),
            "export_s": round(export_s, 1),
            "onnx_mb": round(export.onnx_path.stat().st_size / 2**20, 1),
            "export_onnx_max_diff": export.onnx_max_diff,
            "export_patch_path_max_diff": export.patch_path_max_diff,
            "torch_s": round(statistics.median(times["torch"]), 2),
            "onnx_s": round(statistics.median(times["onnx"]), 2),
            "all_s": times,
            "map_max_diff": float(np.abs(maps["torch"].image_map
                                         - maps["onnx"].image_map).max()),
        }
        record["ratio_onnx_over_torch"] = round(record["onnx_s"] / record["torch_s"], 2)
    json.dump(record, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
