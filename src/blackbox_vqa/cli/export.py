"""``bbvqa export``: write a PyTorch model as ``model.onnx`` plus its PyTorch graph."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from blackbox_vqa.cli.model_options import ModelSettings, with_model_options
from blackbox_vqa.errors import InputError

__all__ = ["export_command"]


class GraphChoice(str, Enum):
    """Formats ``--graph`` accepts."""

    auto = "auto"
    pt2 = "pt2"
    torchscript = "torchscript"


class OnnxExporterChoice(str, Enum):
    """ONNX exporters ``--onnx-exporter`` accepts."""

    auto = "auto"
    dynamo = "dynamo"
    torchscript = "torchscript"


@with_model_options
def export_command(
    out: Annotated[Path, typer.Option(help="Output folder for model.onnx and the graph.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec: easyvqa, "
                                       "package.module:factory (a TorchAdapter) or hf:PATH "
                                       "(a ViLT-style classifier).")] = "easyvqa",
    graph: Annotated[GraphChoice, typer.Option(help="PyTorch graph format: pt2 "
                                               "(torch.export), torchscript (traced), or "
                                               "auto (torchscript for LSTM/GRU/RNN "
                                               "models, else pt2 when it keeps the question "
                                               "length dynamic).")] = GraphChoice.auto,
    onnx_exporter: Annotated[OnnxExporterChoice, typer.Option(
        help="ONNX exporter: dynamo (torch.export-based), torchscript, or auto "
        "(torchscript for recurrent models, else dynamo)."
    )] = OnnxExporterChoice.auto,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 20,
    tolerance: Annotated[float, typer.Option(help="Largest accepted difference of the "
                                             "answer probabilities.")] = 1e-4,
    image: Annotated[list[Path] | None, typer.Option("--image", "-i", help="Verification "
                                                     "image (repeatable, paired with "
                                                     "--question).")] = None,
    question: Annotated[list[str] | None, typer.Option("--question", "-q", help="Verification "
                                                       "question (repeatable).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an earlier export in --out.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
    *,
    model_settings: ModelSettings,
) -> None:
    """Export a PyTorch model to ONNX and a PyTorch graph, verified against the model."""
    from blackbox_vqa.cli.model_options import load
    from blackbox_vqa.cli.progress import stderr_console
    from blackbox_vqa.exporters.onnx import export_model
    from blackbox_vqa.images import load_image

    images, questions = list(image or []), list(question or [])
    if len(images) != len(questions):
        raise InputError(
            f"--image and --question pair up: got {len(images)} image(s) and "
            f"{len(questions)} question(s)"
        )
    samples = [(load_image(path), text) for path, text in zip(images, questions, strict=True)]
    console = stderr_console()
    vqa = load(model, model_settings).model
    if _is_hf(vqa):
        _export_hf(vqa, out, samples, tolerance, force)
        return
    result = export_model(
        vqa, out, graph=graph.value, onnx_exporter=onnx_exporter.value, opset=opset,
        tolerance=tolerance, samples=samples or None, force=force,
        log=lambda message: console.print(message),
    )
    total = result.onnx_seconds + result.graph_seconds + result.verify_seconds
    print(f"wrote {result.onnx_path} ({_size(result.onnx_bytes)}, {result.onnx_exporter} "
          f"exporter, opset {result.opset})")
    print(f"wrote {result.graph_path} ({_size(result.graph_bytes)}, {result.graph_format})")
    if result.graph_note:
        print(f"note: {result.graph_note}")
    print(f"verified on {result.samples} inputs: max abs diff of answer probabilities "
          f"ONNX Runtime vs PyTorch {result.onnx_max_diff:.3g}, graph vs PyTorch "
          f"{result.graph_max_diff:.3g} (tolerance {tolerance:g})")
    print(f"export {result.onnx_seconds + result.graph_seconds:.1f} s, verification "
          f"{result.verify_seconds:.1f} s, total {total:.1f} s")


def _is_hf(vqa: object) -> bool:
    return type(vqa).__module__ == "blackbox_vqa.adapters.hf.vqa"


def _export_hf(vqa: object, out: Path, samples: Sequence[tuple[object, str]],
               tolerance: float, force: bool) -> None:
    """A Hugging Face classifier (ViLT...): model.onnx with the model's own inputs."""
    from blackbox_vqa.exporters.hf_onnx import export_hf_model

    result = export_hf_model(vqa, out, samples=samples or None,  # type: ignore[arg-type]
                             tolerance=tolerance, force=force)
    print(f"wrote {result.onnx_path} (inputs: {', '.join(result.inputs)}) and the processor "
          f"and config beside it")
    print(f"verified on {result.samples} inputs: max abs diff of answer scores ONNX Runtime "
          f"vs PyTorch {result.onnx_max_diff:.3g}; deterministic all-patches path vs the "
          f"model's own forward {result.patch_path_max_diff:.3g} (tolerance {tolerance:g}); "
          f"{result.seconds:.1f} s")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"
