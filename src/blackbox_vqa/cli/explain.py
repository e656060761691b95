"""``bbvqa explain``: explain one answer of one model on one image and question."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from blackbox_vqa.errors import InputError

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
    method: Annotated[Method, typer.Option(help="Explanation method: occlusion, guided-bp "
                                           "(guided backpropagation), gradient (plain) or "
                                           "all.")] = Method.occlusion,
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
    http_format: Annotated[str, typer.Option(help="Wire format of an http:// model: ours, "
                                             "hf (top-k lists) or answer-only.")] = "ours",
    header: Annotated[list[str] | None, typer.Option(help="Extra HTTP header 'Name: value' "
                                                     "(repeatable; never printed).")] = None,
    http_concurrency: Annotated[int | None, typer.Option(help="Most HTTP requests in flight "
                                                         "(default 4).")] = None,
    http_timeout: Annotated[float, typer.Option(help="HTTP read timeout, seconds.")] = 60.0,
    answers_file: Annotated[Path | None, typer.Option("--answers", help="ONNX file without "
                                                      "metadata: its answers, one per line "
                                                      "(or a JSON list).")] = None,
    vocab: Annotated[Path | None, typer.Option(help="ONNX file without metadata: its "
                                               "vocabulary (JSON word->id, or one word per "
                                               "line, ids from 2).")] = None,
    image_size: Annotated[str | None, typer.Option(help="ONNX file: model input size N or "
                                                   "HxW.")] = None,
    mean: Annotated[str | None, typer.Option(help="ONNX file: normalisation mean 'r,g,b' "
                                             "(0-1 scale; default ImageNet's).")] = None,
    std: Annotated[str | None, typer.Option(help="ONNX file: normalisation std 'r,g,b' "
                                            "(0-1 scale; default ImageNet's).")] = None,
    output_kind: Annotated[str | None, typer.Option(help="ONNX file: its output is "
                                                    "softmax (logits), sigmoid (logits) or "
                                                    "probs.")] = None,
    image_input: Annotated[str | None, typer.Option(help="ONNX file: name of the image "
                                                    "input (default: found by type).")] = None,
    tokens_input: Annotated[str | None, typer.Option(help="ONNX file: name of the token "
                                                     "input (default: found by type).")] = None,
    output_name: Annotated[str | None, typer.Option(help="ONNX file: name of the score "
                                                    "output (default: the only one).")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads "
                                                "(default: one per core).")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Explain which image cells and question words made the model answer as it did."""
    from blackbox_vqa.cli.options import parse_size
    from blackbox_vqa.explainers.batching import parse_batch_size
    from blackbox_vqa.explainers.masks import parse_baseline
    from blackbox_vqa.images import load_image
    from blackbox_vqa.specs import ModelOptions, load_model
    from blackbox_vqa.text import validate_question

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
    vqa = load_model(model, ModelOptions(extra={
        "http_format": http_format, "http_headers": header or [],
        "http_concurrency": http_concurrency, "http_timeout": http_timeout,
        **_onnx_options(model, answers_file, vocab, image_size, mean, std, output_kind,
                        image_input, tokens_input, output_name, threads)}))
    gradients = _gradient_source(method, model, vqa)
    if callable(prepare := getattr(vqa, "prepare", None)):
        prepare(pixels, question.strip())  # HTTP models: batch sizes, learned answers
    occlusion, seconds = None, 0.0
    if method in (Method.occlusion, Method.all):
        occlusion, seconds = _occlude(
            vqa, pixels, question, answer=answer, grid=grid, window=window_hw,
            stride=stride_hw, baseline=baseline, batch_size=batch_size,
        )
        answer = occlusion.answer
    runs = _run_gradients(method, gradients, pixels, question, answer)
    doc = _document(model, vqa, image, pixels, question, occlusion, seconds, runs)
    _add_gradient_sections(doc, runs)
    folder = _output_folder(out, question, force)
    written = _write(folder, doc, pixels, occlusion, runs)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        console = _console()
        if occlusion is not None:
            _print_summary(console, doc, occlusion)
        _print_gradients(console, doc, runs)
        console.print(f"written to {escape(str(folder))}/ ({', '.join(written)})")


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
    spec: str, vqa: Any, image: Path, pixels: Any, question: str, occlusion: Any,
    seconds: float, runs: list[GradientRun],
) -> dict[str, Any]:
    from blackbox_vqa.adapters.base import model_name
    from blackbox_vqa.explanation import explanation_dict

    height, width = pixels.shape[:2]
    name = model_name(vqa)
    semantics = getattr(vqa, "score_semantics", None)
    return explanation_dict(
        model=spec if name in ("model", type(vqa).__name__) else name,
        answers=list(vqa.answers),
        question=question.strip(),
        image={"path": str(image), "width": width, "height": height},
        occlusion=occlusion,
        primary=runs[0].result if runs else None,
        timing={"occlusion_s": round(seconds, 4)} if occlusion is not None else {},
        sections={"score_semantics": semantics} if semantics else None,
    )


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def escape(text: str) -> str:
    """Escape Rich markup in untrusted text (questions, answers, paths)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _output_folder(out: Path | None, question: str, force: bool) -> Path:
    from blackbox_vqa.outputs import new_output_dir, prepare_output_dir, slugify

    folder = out if out is not None else new_output_dir(Path.cwd(), f"bbvqa-{slugify(question)}")
    return prepare_output_dir(folder, force=force, marker="explanation.json")


def _write(
    folder: Path, doc: dict[str, Any], pixels: Any, occlusion: Any,
    runs: list[GradientRun] | None = None,
) -> list[str]:
    """Write every output file atomically; return their names."""
    from blackbox_vqa.outputs import atomic_write_json
    from blackbox_vqa.report.figures import heatmap_figure, save_figure, words_figure

    answer = doc["answer"]
    figures: list[tuple[str, Callable[[], Any]]] = [] if occlusion is None else [
        ("occlusion.png", lambda: heatmap_figure(
            pixels, occlusion.image_map, title=f"occlusion: {answer!r}")),
        ("words.png", lambda: words_figure(
            occlusion.words, occlusion.word_map, title=f"word occlusion: {answer!r}")),
    ]
    figures += _gradient_figures(pixels, runs or [])
    arrays = _write_gradient_arrays(folder, runs or [])
    for name, build in figures:
        save_figure(build(), folder / name)
    atomic_write_json(folder / "explanation.json", doc)
    from blackbox_vqa.report.html import write_explanation_report

    write_explanation_report(folder / "report.html", doc, pixels)
    return ["explanation.json", *(name for name, _ in figures), *arrays, "report.html"]


def _print_summary(console: Any, doc: dict[str, Any], occlusion: Any) -> None:
    from rich.table import Table

    console.print(f"[bold]Q:[/bold] {escape(doc['question'])}")
    console.print(f"[bold]A:[/bold] {escape(doc['answer'])}  (p = {doc['probability']:.4f})")
    others = ", ".join(f"{a['answer']} {a['score']:.3f}" for a in doc["top_answers"][1:4])
    console.print(f"   next: {escape(others)}")
    words = Table(title="word occlusion", caption="importance: drop in p without the word")
    words.add_column("#", justify="right")
    words.add_column("word")
    words.add_column("importance", justify="right")
    for i, (word, value) in enumerate(zip(occlusion.words, occlusion.word_map, strict=True)):
        words.add_row(str(i), escape(word), f"{value:+.4f}")
    console.print(words)
    cells = Table(title="top image patches", caption="importance: drop in p when occluded")
    cells.add_column("row", justify="right")
    cells.add_column("col", justify="right")
    cells.add_column("importance", justify="right")
    flat = occlusion.image_map.reshape(-1)
    cols = occlusion.image_map.shape[1] if occlusion.image_map.ndim == 2 else 1
    for index in np.argsort(-flat, kind="stable")[:5]:
        cells.add_row(str(index // cols), str(index % cols), f"{flat[index]:+.4f}")
    console.print(cells)
    flips = doc["occlusion"]["flips"]
    console.print(
        f"answer flips: {flips['image']}/{flips['image_total']} patches, "
        f"{flips['words']}/{flips['words_total']} words"
    )


# -- gradient methods (guided-bp, gradient) -----------------------------------------------

_GRADIENT_KINDS = {
    # method -> [(explanation.json key, method name, guided)]
    Method.occlusion: [],
    Method.guided_bp: [("guided_backprop", "guided-bp", True)],
    Method.gradient: [("gradient", "gradient", False)],
    Method.all: [("guided_backprop", "guided-bp", True), ("gradient", "gradient", False)],
}


@dataclass(frozen=True)
class GradientRun:
    """One gradient method's outcome: a result, or the reason it could not run."""

    key: str
    name: str
    result: Any = None
    reason: str = ""
    source: str = ""
    seconds: float = 0.0


def _onnx_options(
    spec: str, answers_file: Path | None, vocab: Path | None, image_size: str | None,
    mean: str | None,
    std: str | None, output_kind: str | None, image_input: str | None,
    tokens_input: str | None, output_name: str | None, threads: int | None,
) -> dict[str, Any]:
    """``ModelOptions.extra`` entries for ONNX files (unset options are left out)."""
    from blackbox_vqa.adapters.pytorch import OUTPUT_KINDS
    from blackbox_vqa.specs import spec_kind

    if output_kind is not None and output_kind not in OUTPUT_KINDS:
        raise InputError(
            f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}, got {output_kind!r}"
        )
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    values = {
        "answers_file": answers_file, "vocab_file": vocab, "image_size": image_size,
        "mean": mean, "std": std, "output": output_kind, "image_input": image_input,
        "tokens_input": tokens_input, "output_name": output_name, "threads": threads,
    }
    given = {key: value for key, value in values.items() if value is not None}
    if given and spec_kind(spec) != "onnx":
        options = ", ".join("--" + _ONNX_OPTION_NAMES[key] for key in given)
        raise InputError(f"{options}: only for .onnx models, not for {spec!r}")
    return given


_ONNX_OPTION_NAMES = {
    "answers_file": "answers", "vocab_file": "vocab", "image_size": "image-size",
    "mean": "mean", "std": "std", "output": "output-kind", "image_input": "image-input",
    "tokens_input": "tokens-input", "output_name": "output-name", "threads": "threads",
}


def _gradient_source(method: Method, spec: str, vqa: Any) -> tuple[Any, str, str]:
    """``(model with gradients, where they come from, "")`` or ``(None, "", reason)``.

    ``--method guided-bp`` or ``gradient`` on a model without gradients raises
    :class:`GradientUnavailableError` (exit code 2); ``--method all`` goes on without.
    """
    from blackbox_vqa.errors import GradientUnavailableError
    from blackbox_vqa.gradient_source import find_gradient_source

    if not _GRADIENT_KINDS[method]:
        return None, "", ""
    source = find_gradient_source(spec, vqa)
    if source[0] is None and method is not Method.all:
        raise GradientUnavailableError(f"{source[2]}, or use --method occlusion")
    return source


def _run_gradients(
    method: Method, source: tuple[Any, str, str], pixels: Any, question: str,
    answer: str | None,
) -> list[GradientRun]:
    from blackbox_vqa.explainers.guided_backprop import GuidedBackprop

    model, where, reason = source
    runs = []
    for key, name, guided in _GRADIENT_KINDS[method]:
        if model is None:
            runs.append(GradientRun(key, name, reason=reason))
            continue
        started = time.perf_counter()
        result = GuidedBackprop(model, guided=guided).explain(pixels, question, answer=answer)
        runs.append(GradientRun(key, name, result, source=where,
                                seconds=time.perf_counter() - started))
    return runs


def _add_gradient_sections(doc: dict[str, Any], runs: list[GradientRun]) -> None:
    from blackbox_vqa.explainers.guided_backprop import gradient_dict

    for run in runs:
        if run.result is None:
            doc[run.key] = {"available": False, "reason": run.reason}
            continue
        doc[run.key] = gradient_dict(run.result, gradient_file=f"{run.key}.npy",
                                     source=run.source)
        doc.setdefault("timing", {})[f"{run.key}_s"] = round(run.seconds, 4)


def _gradient_figures(pixels: Any, runs: list[GradientRun]) \
        -> list[tuple[str, Callable[[], Any]]]:
    from blackbox_vqa.report.figures import heatmap_figure, words_figure

    figures: list[tuple[str, Callable[[], Any]]] = []
    for run in runs:
        result = run.result
        if result is None:
            continue
        title = f"{run.name}: {result.answer!r}"
        top = float(result.image_map.max()) or 1e-12
        figures.append((f"{run.key}.png", partial(
            heatmap_figure, pixels, result.image_map, title=title,
            label="max over channels of |gradient|", vmin=0.0, vmax=top, cmap="inferno")))
        if result.word_map.size:
            figures.append((f"{run.key}_words.png", partial(
                words_figure, result.tokens, result.word_map, title=title,
                label="L2 norm of the word's embedding gradient")))
    return figures


def _write_gradient_arrays(folder: Path, runs: list[GradientRun]) -> list[str]:
    from blackbox_vqa.outputs import atomic_write

    names = []
    for run in runs:
        if run.result is not None:
            atomic_write(folder / f"{run.key}.npy", partial(_save_npy, run.result.gradient))
            names.append(f"{run.key}.npy")
    return names


def _save_npy(array: Any, handle: Any) -> None:
    np.save(handle, array)


def _print_gradients(console: Any, doc: dict[str, Any], runs: list[GradientRun]) -> None:
    if runs and doc.get("occlusion") is None:
        console.print(f"[bold]Q:[/bold] {escape(doc['question'])}")
        console.print(f"[bold]A:[/bold] {escape(doc['answer'])}  (p = {doc['probability']:.4f})")
    for run in runs:
        result = run.result
        if result is None:
            console.print(f"{run.name}: unavailable: {escape(run.reason)}")
            continue
        if run.source != "model":
            console.print(f"{run.name}: gradients from the exported PyTorch graph "
                          f"{escape(run.source)} (ONNX Runtime has none)")
        if result.word_map.size:
            ranked = np.argsort(-result.word_map, kind="stable")[:3]
            words = ", ".join(f"{result.tokens[i]} {result.word_map[i]:.3g}" for i in ranked)
            console.print(f"{run.name}: words by gradient norm: {escape(words)}")
        elif result.words_note:
            console.print(f"{run.name}: no word gradients ({result.words_note})")
        row, col = np.unravel_index(int(np.argmax(result.image_map)), result.image_map.shape)
        console.print(f"{run.name}: largest |gradient| at model pixel ({row}, {col}) of "
                      f"{result.image_size[0]}x{result.image_size[1]}")
