"""``bbvqa explain``: explain one answer of one model on one image and question."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from blackbox_vqa.errors import InputError, NotSupportedError

__all__ = ["Method", "explain_command"]


class Method(str, Enum):
    """Explanation methods ``--method`` accepts."""

    occlusion = "occlusion"
    guided_bp = "guided-bp"
    gradient = "gradient"
    all = "all"


def explain_command(
    image: Annotated[Path, typer.Option("--image", "-i", help="Image file (PNG, JPEG, ...).")],
    question: Annotated[str, typer.Option("--question", "-q", help="The question.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec: easyvqa, "
                                       "package.module:factory, ...")] = "easyvqa",
    method: Annotated[Method, typer.Option(help="Explanation method.")] = Method.occlusion,
    answer: Annotated[str | None, typer.Option(help="Explain this answer instead of the "
                                               "predicted one.")] = None,
    grid: Annotated[int, typer.Option(help="Occlusion grid cells per side.")] = 16,
    window: Annotated[str | None, typer.Option(help="Sliding window N or HxW pixels "
                                               "(instead of the grid).")] = None,
    stride: Annotated[str | None, typer.Option(help="Window step N or HxW pixels "
                                               "(default: the window).")] = None,
    baseline: Annotated[str, typer.Option(help="Patch fill: imagenet-mean, black, blur "
                                          "or R,G,B (0-255).")] = "imagenet-mean",
    batch_size: Annotated[str, typer.Option(help="Perturbed inputs per model call: auto "
                                            "or N.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: a new folder "
                                             "named after the question).")] = None,
    force: Annotated[bool, typer.Option(help="Allow --out to hold an earlier "
                                        "explanation.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print explanation.json to "
                                          "stdout.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Explain which image cells and question words made the model answer as it did."""
    from blackbox_vqa.cli.options import parse_size
    from blackbox_vqa.explainers.batching import parse_batch_size
    from blackbox_vqa.explainers.masks import parse_baseline
    from blackbox_vqa.images import load_image
    from blackbox_vqa.specs import load_model
    from blackbox_vqa.text import validate_question

    if method is not Method.occlusion:
        raise NotSupportedError(f"--method {method.value} is not supported yet; use occlusion")
    if grid < 1:
        raise InputError(f"--grid must be >= 1, got {grid}")
    window_hw = parse_size(window, "--window")
    stride_hw = parse_size(stride, "--stride")
    if stride_hw is not None and window_hw is None:
        raise InputError("--stride needs --window")
    parse_baseline(baseline)
    parse_batch_size(batch_size)
    validate_question(question)
    pixels = load_image(image)
    vqa = load_model(model)
    occlusion, seconds = _occlude(
        vqa, pixels, question, answer=answer, grid=grid, window=window_hw, stride=stride_hw,
        baseline=baseline, batch_size=batch_size,
    )
    doc = _document(model, vqa, image, pixels, question, occlusion, seconds)
    folder = _output_folder(out, question, force)
    _write(folder, doc, pixels, occlusion)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        _print_summary(doc, occlusion, folder)


def _occlude(vqa: Any, pixels: Any, question: str, **options: Any) -> tuple[Any, float]:
    from blackbox_vqa.cli.progress import progress_bar
    from blackbox_vqa.explainers.occlusion import Occlusion

    answer = options.pop("answer")
    started = time.perf_counter()
    with progress_bar("occlusion") as update:
        explainer = Occlusion(vqa, progress=update, **options)
        result = explainer.explain(pixels, question, answer=answer)
    return result, time.perf_counter() - started


def _document(
    spec: str, vqa: Any, image: Path, pixels: Any, question: str, occlusion: Any, seconds: float
) -> dict[str, Any]:
    from blackbox_vqa.adapters.base import model_name
    from blackbox_vqa.explanation import explanation_dict

    height, width = pixels.shape[:2]
    name = model_name(vqa)
    return explanation_dict(
        model=spec if name in ("model", type(vqa).__name__) else name,
        answers=list(vqa.answers),
        question=question.strip(),
        image={"path": str(image), "width": width, "height": height},
        occlusion=occlusion,
        timing={"occlusion_s": round(seconds, 4)},
    )


def _output_folder(out: Path | None, question: str, force: bool) -> Path:
    from blackbox_vqa.outputs import new_output_dir, prepare_output_dir, slugify

    folder = out if out is not None else new_output_dir(Path.cwd(), f"bbvqa-{slugify(question)}")
    return prepare_output_dir(folder, force=force, marker="explanation.json")


def _write(folder: Path, doc: dict[str, Any], pixels: Any, occlusion: Any) -> None:
    from blackbox_vqa.outputs import atomic_write_json
    from blackbox_vqa.report.figures import heatmap_figure, save_figure, words_figure

    answer = doc["answer"]
    figures: list[tuple[str, Callable[[], Any]]] = [
        ("occlusion.png", lambda: heatmap_figure(
            pixels, occlusion.image_map, title=f"occlusion: {answer!r}")),
        ("words.png", lambda: words_figure(
            occlusion.words, occlusion.word_map, title=f"word occlusion: {answer!r}")),
    ]
    for name, build in figures:
        save_figure(build(), folder / name)
    atomic_write_json(folder / "explanation.json", doc)
    from blackbox_vqa.report.html import write_explanation_report

    write_explanation_report(folder / "report.html", doc, pixels)


def _print_summary(doc: dict[str, Any], occlusion: Any, folder: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"[bold]Q:[/bold] {doc['question']}")
    console.print(f"[bold]A:[/bold] {doc['answer']}  (p = {doc['probability']:.4f})")
    others = ", ".join(f"{a['answer']} {a['score']:.3f}" for a in doc["top_answers"][1:4])
    console.print(f"   next: {others}")
    words = Table(title="words (importance = drop in p when the word is removed)")
    words.add_column("#", justify="right")
    words.add_column("word")
    words.add_column("importance", justify="right")
    for i, (word, value) in enumerate(zip(occlusion.words, occlusion.word_map, strict=True)):
        words.add_row(str(i), word, f"{value:+.4f}")
    console.print(words)
    cells = Table(title="most important image patches")
    cells.add_column("row", justify="right")
    cells.add_column("col", justify="right")
    cells.add_column("importance", justify="right")
    flat = occlusion.image_map.reshape(-1)
    cols = occlusion.image_map.shape[1]
    for index in np.argsort(-flat, kind="stable")[:5]:
        cells.add_row(str(index // cols), str(index % cols), f"{flat[index]:+.4f}")
    console.print(cells)
    flips = doc["occlusion"]["flips"]
    console.print(
        f"answer flips: {flips['image']}/{flips['image_total']} patches, "
        f"{flips['words']}/{flips['words_total']} words"
    )
    console.print(f"written to {folder}/ (explanation.json, occlusion.png, words.png)")
