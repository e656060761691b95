"""ONNX Runtime vs PyTorch for occlusion (issue 3), plus export time and file sizes.

For each model of ``models.py`` (``reference``: the easy-VQA reference model, 64 x 64;
``resnet18``: a ResNet-18-sized CNN + LSTM, random weights, 224 x 224) the script

1. exports it with ``export_model`` (``model.onnx`` + the PyTorch graph, self-verified)
   and records the export and verification times and the file sizes;
2. times one full occlusion explanation -- a ``grid x grid`` lattice (default 16) plus
   every word, ``1 + grid**2 + words`` evaluations -- through ``TorchAdapter`` and through
   ``OnnxAdapter`` on the exported file, in one process, for each thread count given
   (used for both torch, ``torch.set_num_threads``, and ONNX Runtime, intra-op threads)
   and each batch size; each repeat runs both, alternating which goes first;
3. checks that both give the same maps (max abs difference);
4. times bare forward passes of the network in torch and of the session in ONNX Runtime
   on one batch of preprocessed inputs (no explainer, no adapter), the kernels' own
   ratio: the floor for the occlusion ratio, since occlusion is nothing but forward passes.

Figures are medians over the repeats; the ratio ONNX/Torch is between medians of the
same run at the same batch size, and between each framework's best batch size.

Run ``python benchmarks/onnx_vs_torch.py --help``; ``--quick`` is a short smoke run.
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
import onnxruntime as ort
import torch

from blackbox_vqa.adapters.onnx.runtime import OnnxAdapter
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.exporters.onnx import export_model
from models import MODEL_NAMES, build_model  # this folder (run as a script)


def _time_occlusion(model: Any, image: Any, question: str, grid: int, batch: str) -> tuple[
        float, Any]:
    explainer = Occlusion(model, grid=grid, batch_size=batch)
    started = time.perf_counter()
    result = explainer.explain(image, question)
    return time.perf_counter() - started, result


def bench_model(name: str, *, threads: list[int], grid: int, repeats: int,
                batches: list[str], bare_batch: int) -> dict[str, Any]:
    """Export ``name`` and time occlusion through both adapters; a JSON-ready record."""
    case = build_model(name)
    torch_model = case.adapter
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        export = export_model(torch_model, Path(folder) / "export")
        export_total = time.perf_counter() - started
        record: dict[str, Any] = {
            "model": name,
            "description": case.description,
            "export": {
                "total_s": round(export_total, 2),
                "onnx_s": round(export.onnx_seconds, 2),
                "graph_s": round(export.graph_seconds, 2),
                "verify_s": round(export.verify_seconds, 2),
                "onnx_exporter": export.onnx_exporter,
                "graph_format": export.graph_format,
                "onnx_mib": round(export.onnx_bytes / 2**20, 2),
                "graph_mib": round(export.graph_bytes / 2**20, 2),
                "weights_mib": round(sum(p.numel() * p.element_size() for p in
                                         torch_model.module.parameters()) / 2**20, 2),
                "onnx_max_diff": export.onnx_max_diff,
                "graph_max_diff": export.graph_max_diff,
            },
            "providers": OnnxAdapter(export.onnx_path).providers,
            "runs": [],
        }
        for count in threads:
            torch.set_num_threads(count)
            onnx_model = OnnxAdapter(export.onnx_path, threads=count)
            for model in (torch_model, onnx_model):  # warm-up: first calls are not timed
                _time_occlusion(model, case.image, case.question, 2, "auto")
            for batch in batches:
                record["runs"].append(_compare(name, torch_model, onnx_model, case, grid,
                                               batch, repeats, count))
            record.setdefault("bare", []).append(
                _bare_forward(name, torch_model, onnx_model, case.question, bare_batch, repeats,
                              count))
        record["best_ratio"] = {
            count: round(min(r["onnx_s"] for r in record["runs"] if r["threads"] == count)
                         / min(r["torch_s"] for r in record["runs"] if r["threads"] == count), 3)
            for count in threads
        }
    return record


def _compare(name: str, torch_model: Any, onnx_model: Any, case: Any, grid: int, batch: str,
             repeats: int, count: int) -> dict[str, Any]:
    """Both adapters at one batch size and thread count, alternating which goes first."""
    times: dict[str, list[float]] = {"torch": [], "onnx": []}
    results: dict[str, Any] = {}
    for repeat in range(repeats):
        order = [("torch", torch_model), ("onnx", onnx_model)]
        for label, model in order if repeat % 2 == 0 else order[::-1]:
            seconds, results[label] = _time_occlusion(model, case.image,
                                                      case.question, grid, batch)
            times[label].append(seconds)
    torch_s, onnx_s = (statistics.median(times[k]) for k in ("torch", "onnx"))
    diff = max(
        float(np.abs(results["onnx"].image_map - results["torch"].image_map).max()),
        float(np.abs(results["onnx"].word_map - results["torch"].word_map).max()),
    )
    run = {
        "batch_size": batch,
        "batch_used": results["torch"].batch_size,
        "evaluations": results["torch"].evaluations,
        "torch_s": round(torch_s, 4),
        "onnx_s": round(onnx_s, 4),
        "ratio": round(onnx_s / torch_s, 3),
        "map_max_diff": diff,
        "torch_all_s": [round(t, 4) for t in times["torch"]],
        "onnx_all_s": [round(t, 4) for t in times["onnx"]],
        "threads": count,
    }
    print(f"  {name} threads {count} batch {batch:>4}: torch {torch_s:.3f} s, "
          f"onnx {onnx_s:.3f} s, ratio {onnx_s / torch_s:.3f}, max map diff {diff:.2g}",
          flush=True)
    return run


def _bare_forward(name: str, torch_model: Any, onnx_model: Any, question: str, batch: int,
                  repeats: int, count: int) -> dict[str, Any]:
    """Bare forward passes on one batch: ``torch_model.module`` vs ``onnx_model.session``."""
    height, width = onnx_model.preprocessing.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    ids = list(onnx_model.tokenizer(question))
    tokens = torch.tensor([ids] * batch, dtype=torch.int64)
    feed = {onnx_model.names.image: images.numpy(), onnx_model.names.tokens: tokens.numpy()}
    module = torch_model.module

    def run_torch() -> None:
        with torch.inference_mode():
            module(images.to(torch_model.device), tokens.to(torch_model.device))

    def run_onnx() -> None:
        onnx_model.session.run(None, feed)

    times: dict[str, list[float]] = {"torch": [], "onnx": []}
    for run in (run_torch, run_onnx):  # warm-up
        run()
    for repeat in range(max(repeats, 3)):
        order = [("torch", run_torch), ("onnx", run_onnx)]
        for label, run in order if repeat % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - started)
    torch_s, onnx_s = (statistics.median(times[k]) for k in ("torch", "onnx"))
    print(f"  {name} threads {count} bare forward, batch {batch}: torch "
          f"{1000 * torch_s / batch:.1f} ms/input, onnx {1000 * onnx_s / batch:.1f} ms/input, "
          f"ratio {onnx_s / torch_s:.3f}", flush=True)
    return {"threads": count, "batch": batch, "torch_ms_per_input": 1000 * torch_s / batch,
            "onnx_ms_per_input": 1000 * onnx_s / batch, "ratio": round(onnx_s / torch_s, 3)}


def _markdown(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Grid {args.grid}x{args.grid} + words; torch and ONNX Runtime with the same thread "
        f"count; median of {args.repeats} repeats.",
        "",
        "| model | threads | batch | evaluations | Torch s | ONNX s | ONNX/Torch | max map diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rec in records:
        for run in rec["runs"]:
            lines.append(
                f"| {rec['model']} | {run['threads']} | {run['batch_size']} "
                f"({run['batch_used']}) | {run['evaluations']} | {run['torch_s']:.3f} | "
                f"{run['onnx_s']:.3f} | {run['ratio']:.2f} | {run['map_max_diff']:.1g} |"
            )
        for count, ratio in rec["best_ratio"].items():
            runs = [r for r in rec["runs"] if r["threads"] == count]
            best_torch = min(runs, key=lambda r: r["torch_s"])
            best_onnx = min(runs, key=lambda r: r["onnx_s"])
            lines.append(
                f"| {rec['model']} | {count} | best of each ({best_torch['batch_size']} / "
                f"{best_onnx['batch_size']}) | | {best_torch['torch_s']:.3f} | "
                f"{best_onnx['onnx_s']:.3f} | **{ratio:.2f}** | |"
            )
    lines += [
        "",
        "Bare forward passes (no explainer, no adapter), median of the same repeats:",
        "",
        "| model | threads | batch | Torch ms/input | ONNX ms/input | ONNX/Torch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rec in records:
        for bare in rec["bare"]:
            lines.append(
                f"| {rec['model']} | {bare['threads']} | {bare['batch']} | "
                f"{bare['torch_ms_per_input']:.1f} | {bare['onnx_ms_per_input']:.1f} | "
                f"{bare['ratio']:.2f} |"
            )
    lines += [
        "",
        "| model | export total s | ONNX export s | graph export s | verify s | exporter | "
        "graph | model.onnx MiB | graph MiB | fp32 weights MiB | max p diff ONNX / graph |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rec in records:
        e = rec["export"]
        lines.append(
            f"| {rec['model']} | {e['total_s']} | {e['onnx_s']} | {e['graph_s']} | "
            f"{e['verify_s']} | {e['onnx_exporter']} | {e['graph_format']} | {e['onnx_mib']} "
            f"| {e['graph_mib']} | {e['weights_mib']} | {e['onnx_max_diff']:.1g} / "
            f"{e['graph_max_diff']:.1g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES),
                        help="comma-separated: " + ", ".join(MODEL_NAMES))
    parser.add_argument("--threads", default=str(os.cpu_count() or 1),
                        help="comma-separated thread counts, each used for both torch and "
                        "ONNX Runtime (default: all cores)")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", default="auto,8,32",
                        help="comma-separated batch sizes ('auto' = the explainer's choice)")
    parser.add_argument("--bare-batch", type=int, default=8,
                        help="batch size of the bare forward-pass timing (default 8)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    parser.add_argument("--quick", action="store_true", help="grid 4, 1 repeat, auto only")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid, args.repeats, args.batch_sizes = 4, 1, "auto"
    print(f"# onnx_vs_torch: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"threads {args.threads}", flush=True)
    counts = [int(t) for t in args.threads.split(",")]
    print("# command: python " + " ".join(sys.argv), flush=True)
    records = [
        bench_model(name.strip(), threads=counts, grid=args.grid, repeats=args.repeats,
                    batches=[b.strip() for b in args.batch_sizes.split(",")],
                    bare_batch=args.bare_batch)
        for name in args.models.split(",")
    ]
    print(_markdown(records, args))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
