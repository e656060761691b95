"""``bbvqa explain``: explain one answer of one model on one image and question.

The work is :func:`blackbox_vqa.explain.explain`; this module parses the options, shows
progress, writes the output folder and prints the summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from blackbox_vqa.cli.method_options import (
    MethodOptions,
    with_method_choice,
    with_method_options,
)
from blackbox_vqa.cli.model_options import ModelSettings, with_model_options
from blackbox_vqa.errors import GradientUnavailableError, ModelError
from blackbox_vqa.explanation import probability_text

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from blackbox_vqa.explanation import Attribution, Explanation

__all__ = ["ANSWER_ONLY", "explain_command", "metric_lines", "modality_line", "terminal_text"]

MARKER = "explanation.json"
ANSWER_ONLY = "answer-only: maps show answer flips, not probabilities"
IGNORED_IMAGE = ("every image cell scores exactly like the original: the server may be "
                 "ignoring the image")


def _request_cache(model: Any) -> Any:
    return getattr(model, "requests", None) if hasattr(model, "mode") else None


def _staged_request_cache(model: str, settings: ModelSettings,
                          folder: Path) -> tuple[ModelSettings, Path | None]:
    """An http model without ``--request-cache`` keeps its requests in ``.NAME.requests``
    beside the output folder ``NAME`` (removed once the folder is written)."""
    from blackbox_vqa.cli.model_options import resolve
    from blackbox_vqa.specs import kind_of

    spec, _, resolved = resolve(model, settings)
    if kind_of(spec).name != "http" or "request_cache" in resolved.given:
        return settings, None
    staged = folder.parent / f".{folder.name}.requests"
    return settings.with_values(request_cache=str(staged)), staged


def _kept_requests(model: Any) -> str | None:
    """Where a failed run's completed requests are kept, for its message."""
    cache = _request_cache(model)
    if cache is None or not (cache.stored or cache.reused):
        return None
    n = cache.stored + cache.reused
    return f"{n} completed requests are kept in {cache.folder}: a rerun reuses them"


def _say_reused(model: Any) -> None:
    cache = _request_cache(model)
    if cache is not None and cache.reused:
        from blackbox_vqa.cli.progress import stderr_console

        stderr_console().print(
            f"request cache: reused {cache.reused} completed requests from "
            f"{terminal_text(str(cache.folder))}, sent {cache.stored}")


def answer_only(found: Explanation | dict[str, Any]) -> bool:
    """Whether the scores of an explanation are answer-only (flip maps)."""
    sections = found.sections if not isinstance(found, dict) else found
    semantics = sections.get("score_semantics")
    return isinstance(semantics, dict) and semantics.get("kind") == "answer_only"


def _with_warnings(found: Explanation, model: Any) -> Explanation:
    """A remote model whose every image cell scores like the original gets a warning."""
    occlusion = found.attribution("occlusion")
    if not hasattr(model, "mode") or occlusion is None or not occlusion.image_map.size \
            or np.any(occlusion.image_map != 0):
        return found
    return dataclasses.replace(found, sections={**found.sections, "warnings": [IGNORED_IMAGE]})


@with_model_options
@with_method_options
@with_method_choice("method", "occlusion", "Explanation method(s)")
def explain_command(
    image: Annotated[Path, typer.Option("--image", "-i", help="Image file (PNG, JPEG, ...).")],
    question: Annotated[str, typer.Option("--question", "-q", help="The question.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec: easyvqa, "
                                       "package.module:factory, PATH.onnx, http://..., "
                                       "@FILE:NAME ...")] = "easyvqa",
    method: str = "occlusion",
    answer: Annotated[str | None, typer.Option(help="Explain this answer instead of the "
                                               "predicted one.")] = None,
    sanity: Annotated[bool, typer.Option("--sanity", help="Also run the model-parameter "
                                         "randomisation test of each method (models whose "
                                         "weights can be re-initialised).")] = False,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: a new folder "
                                             "named after the question).")] = None,
    force: Annotated[bool, typer.Option(help="Allow --out to hold an earlier "
                                        "explanation.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print explanation.json to "
                                          "stdout.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print how many model calls "
                                          "(HTTP requests at most) the run makes: every "
                                          "method and --metrics; and exit.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
    *,
    model_settings: ModelSettings,
    method_options: MethodOptions,
) -> None:
    """Explain which image cells and question words made the model answer as it did."""
    from blackbox_vqa.cli.model_options import load, resolve
    from blackbox_vqa.explain import Explainer
    from blackbox_vqa.explainers.registry import parse_methods
    from blackbox_vqa.images import load_image
    from blackbox_vqa.outputs import check_output_dir, new_output_dir, slugify
    from blackbox_vqa.text import validate_question

    options = method_options
    settings = options.settings()
    names = parse_methods(method, parameter="--method")
    validate_question(question)
    pixels = load_image(image)
    spec, _, resolved = resolve(model, model_settings)  # a bad model file: refused now
    resolved.extra(spec)
    if dry_run or (_is_http(spec) and not as_json):
        if "occlusion" in names:
            _print_cost(pixels, question, options.grid, options.window, options.stride)
        if "mm-shap" in names:
            _print_shap_cost(pixels, question, settings)
        _print_total(pixels, question, names, settings, metrics=method_options.metrics)
        if dry_run:
            return
    folder = out if out is not None else new_output_dir(
        Path.cwd(), f"bbvqa-{slugify(question)}")
    check_output_dir(folder, force=force, marker=MARKER)
    model_settings, staged_cache = _staged_request_cache(model, model_settings, folder)
    loaded = load(model, model_settings)
    explainer = Explainer(loaded.model, methods=names, settings=settings,
                          label=_label(loaded, model))
    _refuse_unavailable(explainer, method)
    try:
        found = explainer.explain(pixels, question, answer=answer, progress=_progress)
    except ModelError as exc:
        kept = _kept_requests(loaded.model)
        if kept:
            raise type(exc)(f"{exc}; {kept}") from exc
        raise
    _say_reused(loaded.model)
    found = _with_warnings(_with_image_path(found, image), loaded.model)
    found = _checks(found, loaded.model, pixels, settings, metrics=method_options.metrics,
                    sanity=sanity)
    doc = found.to_dict()
    written = _write(folder, force, found, doc, pixels)
    if staged_cache is not None:
        shutil.rmtree(staged_cache, ignore_errors=True)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        console = _console()
        _print(console, found)
        console.print(f"written to {terminal_text(str(folder))}/ ({', '.join(written)})")


def _is_http(text: str) -> bool:
    return text.strip().lower().startswith(("http://", "https://"))


def _print_cost(pixels: Any, question: str, grid: int, window: Any, stride: Any) -> None:
    """Print the number of model calls occlusion makes, before any is made (HTTP models,
    where calls cost, and ``--dry-run``)."""
    from blackbox_vqa.explainers.masks import occlusion_evaluations
    from blackbox_vqa.text import split_words

    words = len(split_words(question))
    count = occlusion_evaluations(int(pixels.shape[0]), int(pixels.shape[1]), words,
                                  grid=grid, window=window, stride=stride)
    cells = count - 1 - words
    what = f"{grid}x{grid} grid" if window is None else "windows"
    line = (f"occlusion: {count} model inputs (1 original + {cells} cells of the {what} + "
            f"{words} words); an endpoint that takes one input per request gets at most "
            f"{count} requests")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _print_total(pixels: Any, question: str, names: Any, settings: Any, *,
                 metrics: bool) -> None:
    """Print the model inputs of the whole run: every method and the metrics."""
    from blackbox_vqa.evaluation.run_cost import request_count, total_line
    from blackbox_vqa.text import split_words

    count = request_count(int(pixels.shape[0]), int(pixels.shape[1]),
                          len(split_words(question)), names, settings, metrics=metrics)
    sys.stdout.write(total_line(count) + "\n")
    sys.stdout.flush()


def _print_shap_cost(pixels: Any, question: str, settings: Any) -> None:
    """Print how many inputs MM-SHAP scores at most (each distinct coalition once)."""
    from blackbox_vqa.explainers.modality_share import ModalityShare
    from blackbox_vqa.explainers.shapley import modality_share_evaluations
    from blackbox_vqa.text import split_words

    own = settings.of("mm-shap")
    grid, permutations = own.shap_grid, own.shap_permutations
    words = len(split_words(question))
    players = ModalityShare.players_of(pixels.shape, question, grid)
    count = modality_share_evaluations(players, permutations, "antithetic")
    line = (f"mm-shap: at most {count} model inputs ({players} players: {grid}x{grid} cells "
            f"+ {words} words; {permutations} permutations of {players - 1} new coalitions "
            f"each + the whole input + the empty one, each coalition scored once); an "
            f"endpoint that takes one input per request gets at most {count} requests")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _label(loaded: Any, text: str) -> str:
    """The model's own name when it has one, else its spec (as shown, no credentials)."""
    from blackbox_vqa.adapters.base import model_name

    name = model_name(loaded.model)
    if text.strip().startswith("@") or name in ("model", type(loaded.model).__name__):
        return str(loaded.label)
    return name


def _refuse_unavailable(explainer: Any, method: str) -> None:
    """A method asked for by name that the model cannot serve is an error (exit 2);
    ``all`` goes on without it."""
    if "all" in [m.strip().lower() for m in method.split(",")]:
        return
    if explainer.unavailable:
        name, gone = next(iter(explainer.unavailable.items()))
        others = [m for m in explainer.available]
        hint = (f"; use --method {','.join(others)} instead" if others
                else "; use --method occlusion instead")
        reason = str(gone.reason)
        said = name.replace("-", " ") + ": "  # the reason may name its method already
        if reason.lower().startswith(said):
            reason = reason[len(said):]
        raise GradientUnavailableError(f"{name}: {reason}{hint}")


@contextmanager
def _progress(method: str) -> Iterator[Callable[[int, int], None]]:
    from blackbox_vqa.cli.progress import progress_bar

    with progress_bar(method) as update:
        yield update


def _checks(found: Explanation, model: Any, pixels: Any, settings: Any, *, metrics: bool,
            sanity: bool) -> Explanation:
    """The explanation with its ``metrics`` and ``sanity`` sections, when asked for."""
    from dataclasses import replace

    from blackbox_vqa.cli.progress import stderr_console
    from blackbox_vqa.evaluation.metrics import explanation_metrics, explanation_sanity

    sections = dict(found.sections)
    if metrics:
        with stderr_console().status("faithfulness metrics"):
            sections["metrics"] = explanation_metrics(
                model, pixels, found, baseline=settings.baseline,
                batch_size=settings.batch_size)
    if sanity:
        with stderr_console().status("randomisation sanity check"):
            sections["sanity"] = explanation_sanity(model, pixels, found, settings)
    return replace(found, sections=sections)


def _with_image_path(found: Explanation, image: Path) -> Explanation:
    from dataclasses import replace

    return replace(found, image={**found.image, "path": str(image)})


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def terminal_text(text: object) -> str:
    """Untrusted text (questions, answers, paths, messages) made safe to print: control
    characters shown escaped (a model's answer cannot move the cursor or retitle the
    terminal) and Rich markup escaped."""
    from rich.markup import escape as rich_escape

    from blackbox_vqa.text import terminal_safe

    return rich_escape(terminal_safe(str(text)))



def _write(folder: Path, force: bool, found: Explanation, doc: dict[str, Any],
           pixels: Any) -> list[str]:
    """Write every output file into a staged folder that becomes ``folder`` as a whole;
    return the file names."""
    from blackbox_vqa.outputs import atomic_write, atomic_write_json, staged_output_dir
    from blackbox_vqa.report.html import write_explanation_report

    figures = _figures(found, pixels)
    with staged_output_dir(folder, force=force, marker=MARKER) as stage:
        for name, build in figures:
            _save(build(), stage / name)
        arrays = []
        for attribution in found.attributions.values():
            for name, array in attribution.arrays.items():
                atomic_write(stage / name, partial(_save_npy, array))
                arrays.append(name)
        write_explanation_report(stage / "report.html", found, pixels)
        atomic_write_json(stage / MARKER, doc)
    return [MARKER, *(name for name, _ in figures), *arrays, "report.html"]


def _save(figure: Any, path: Path) -> None:
    from blackbox_vqa.report.figures import save_figure

    save_figure(figure, path)


def _figures(found: Explanation, pixels: Any) -> list[tuple[str, Callable[[], Any]]]:
    """``(file name, build)`` of each figure: the image map and the word bars per method
    (occlusion keeps its historic names ``occlusion.png`` and ``words.png``)."""
    from blackbox_vqa.explainers.registry import get_method
    from blackbox_vqa.report.figures import heatmap_figure, words_figure

    figures: list[tuple[str, Callable[[], Any]]] = []
    suffix = f"\n({ANSWER_ONLY})" if answer_only(found) else ""
    for attribution in found.attributions.values():
        title = f"{attribution.method}: {attribution.answer!r}{suffix}"
        label = get_method(attribution.method).image_label
        words_name = "words.png" if attribution.key == "occlusion" else \
            f"{attribution.key}_words.png"
        if attribution.image_map.size:
            if attribution.signed:
                figures.append((f"{attribution.key}.png", partial(
                    heatmap_figure, pixels, attribution.image_map, title=title)))
            else:
                top = float(attribution.image_map.max()) or 1e-12
                figures.append((f"{attribution.key}.png", partial(
                    heatmap_figure, pixels, attribution.image_map, title=title,
                    label=label, vmin=0.0, vmax=top, cmap="inferno")))
        if attribution.word_map.size:
            words_label = ({} if attribution.signed else
                           {"label": "L2 norm of the word's embedding gradient"})
            figures.append((words_name, partial(
                words_figure, attribution.tokens, attribution.word_map,
                title=_words_title(attribution) + suffix, **words_label)))
    return figures


def _words_title(attribution: Attribution) -> str:
    if attribution.key == "occlusion":
        return f"word occlusion: {attribution.answer!r}"
    return f"{attribution.method}: {attribution.answer!r}"


def _save_npy(array: Any, handle: Any) -> None:
    np.save(handle, array)


def _print(console: Any, found: Explanation) -> None:
    console.print(f"[bold]Q:[/bold] {terminal_text(found.question)}")
    flips = answer_only(found)
    semantics = found.sections.get("score_semantics") or {}
    sequence = semantics.get("kind") == "sequence"
    score = "answer-only" if flips else f"p = {probability_text(found.probability)}"
    if sequence and not flips and found.probability > 0:
        score += f", log p = {math.log(found.probability):.4f}"
    console.print(f"[bold]A:[/bold] {terminal_text(found.answer)}  ({score})")
    if flips:
        console.print(ANSWER_ONLY)
    for note in semantics.get("notes", ()):
        if note != ANSWER_ONLY:
            console.print(f"note: {terminal_text(note)}")
    for warning in found.sections.get("warnings", ()):
        console.print(f"warning: {terminal_text(warning)}")
    occlusion = found.attribution("occlusion")
    if sequence and not flips and found.probability < 1e-3 and occlusion is not None \
            and occlusion.extras.get("score") != "log-probability":
        console.print("note: the answer's probability is under 0.001, so every drop in it "
                      "is too; --score log-probability compares log-likelihoods instead")
    if occlusion is not None and not sequence:
        # (a sequence score has no competing answers: only "(other)", 1 - p)
        others = ", ".join(f"{a} {s:.3f}" for a, s in found.top_answers[1:4])
        console.print(f"   next: {terminal_text(others)}")
    for attribution in found.attributions.values():
        if attribution.key == "occlusion":
            _print_occlusion(console, attribution, flips=flips)
        elif attribution.key in ("guided_backprop", "gradient"):
            _print_gradient(console, attribution)
        elif attribution.key == "mm_shap":
            console.print(modality_line(attribution))
            _print_generic(console, attribution)
        else:
            _print_generic(console, attribution)
        for line in token_lines(attribution):
            console.print(terminal_text(line), soft_wrap=True)
    for name, gone in found.unavailable.items():
        console.print(f"{name}: unavailable: {terminal_text(gone.reason)}")
    for line in metric_lines(found.sections):
        console.print(terminal_text(line))


def _print_occlusion(console: Any, occlusion: Attribution, *, flips: bool = False) -> None:
    from rich.table import Table

    logs = occlusion.extras.get("score") == "log-probability"
    what = "1 where the answer flips" if flips else ("drop in log p" if logs else "drop in p")
    words = Table(title="word occlusion", caption=f"importance: {what} without the word")
    words.add_column("#", justify="right")
    words.add_column("word")
    words.add_column("importance", justify="right")
    shown = _importance(np.concatenate([occlusion.word_map.reshape(-1),
                                        occlusion.image_map.reshape(-1)]))
    for i, (word, value) in enumerate(zip(occlusion.tokens, occlusion.word_map, strict=True)):
        words.add_row(str(i), terminal_text(word), shown(value))
    console.print(words)
    cells = Table(title="top image patches", caption=f"importance: {what} when occluded")
    cells.add_column("row", justify="right")
    cells.add_column("col", justify="right")
    cells.add_column("importance", justify="right")
    flat = occlusion.image_map.reshape(-1)
    cols = occlusion.image_map.shape[1] if occlusion.image_map.ndim == 2 else 1
    for index in np.argsort(-flat, kind="stable")[:5]:
        cells.add_row(str(index // cols), str(index % cols), shown(flat[index]))
    console.print(cells)
    counts = occlusion.extras["flips"]
    console.print(
        f"answer flips: {counts['image']}/{counts['image_total']} patches, "
        f"{counts['words']}/{counts['words_total']} words"
    )


def _importance(values: NDArray[np.floating[Any]]) -> Callable[[float], str]:
    """The importance format of one table: 4 decimals, or 3 significant digits in
    scientific notation when every value is under 0.001 in size (tiny probabilities'
    drops would all read ``+0.0000``)."""
    finite = np.abs(values[np.isfinite(values)])
    largest = float(finite.max()) if finite.size else 0.0
    if 0 < largest < 1e-3:
        return lambda value: f"{value:+.3e}"
    return lambda value: f"{value:+.4f}"


def token_lines(found: Attribution) -> list[str]:
    """One line per answer token of a method's per-token maps (none without them): the
    token, its log-probability, and where its map is highest (cell, word)."""
    maps = found.answer_tokens
    if maps is None:
        return []
    lines = []
    count = len(maps.tokens)
    for i, text in enumerate(maps.texts):
        parts = []
        image = maps.image_maps[i]
        if image.size:
            row, col = np.unravel_index(int(np.argmax(image)), image.shape)
            parts.append(f"highest at ({row}, {col}) of {image.shape[0]}x{image.shape[1]} "
                         f"{image[row, col]:+.4g}")
        words = maps.word_maps[i]
        if words.size:
            top = int(np.argmax(words))
            label = found.tokens[top] if top < len(found.tokens) else f"#{top}"
            parts.append(f"top word {label!r} {words[top]:+.4g}")
        lines.append(f"{found.method}: token {i + 1}/{count} {text!r} "
                     f"(log p {maps.logprobs[i]:+.4f}): " + "; ".join(parts))
    return lines


def modality_line(found: Attribution) -> str:
    """MM-SHAP's line: T-SHAP +- s.e., V-SHAP, the budget and the model inputs scored."""
    extras = found.extras
    t_shap, se = extras.get("t_shap"), extras.get("t_shap_se")
    if t_shap is None:
        share = "T-SHAP undefined (every Shapley value is 0)"
    else:
        share = (f"T-SHAP {t_shap:.3f}" + ("" if se is None else f" ± {se:.3f}")
                 + f" (question), V-SHAP {extras['v_shap']:.3f} (image)")
    return (f"{found.method}: {share}; {extras.get('permutations_walked')} permutations, "
            f"{extras.get('evaluations')} model inputs in {extras.get('model_calls')} calls")


def _print_gradient(console: Any, found: Attribution) -> None:
    name, extras = found.method, found.extras
    if extras.get("source") != "model":
        console.print(f"{name}: gradients from the exported PyTorch graph "
                      f"{terminal_text(extras.get('source'))} (ONNX Runtime has none)")
    if extras.get("note"):
        console.print(f"{name}: note: {terminal_text(extras['note'])}")
    if found.word_map.size:
        ranked = np.argsort(-found.word_map, kind="stable")[:3]
        words = ", ".join(f"{found.tokens[i]} {found.word_map[i]:.3g}" for i in ranked)
        console.print(f"{name}: words by gradient norm: {terminal_text(words)}")
    elif extras.get("words_note"):
        console.print(f"{name}: no word gradients ({terminal_text(extras['words_note'])})")
    row, col = np.unravel_index(int(np.argmax(found.image_map)), found.image_map.shape)
    height, width = found.image_map.shape
    console.print(f"{name}: largest |gradient| at model pixel ({row}, {col}) of "
                  f"{height}x{width}")


def _print_generic(console: Any, found: Attribution) -> None:
    """Any other method: its most important cell and words (and integrated gradients'
    completeness check)."""
    check = found.extras.get("completeness")
    if isinstance(check, dict):
        console.print(f"{found.method}: attributions sum to {check['attribution_sum']:+.4g}, "
                      f"score difference {check['score_difference']:+.4g} "
                      f"(gap {check['gap']:+.2g}; more --ig-steps narrow it)")
    if found.image_map.size:
        row, col = np.unravel_index(int(np.argmax(np.abs(found.image_map))),
                                    found.image_map.shape)
        console.print(f"{found.method}: largest |importance| at ({row}, {col}) of "
                      f"{found.image_map.shape[0]}x{found.image_map.shape[1]}: "
                      f"{found.image_map[row, col]:+.4g}")
    if found.word_map.size:
        ranked = np.argsort(-np.abs(found.word_map), kind="stable")[:3]
        words = ", ".join(f"{found.tokens[i]} {found.word_map[i]:+.3g}" for i in ranked)
        console.print(f"{found.method}: top words: {terminal_text(words)}")


def _auc(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def metric_lines(sections: Any) -> list[str]:
    """One line per method for the ``metrics`` and ``sanity`` sections (empty without)."""
    lines: list[str] = []
    for name, entry in (sections.get("metrics") or {}).items():
        parts = []
        if entry.get("image"):
            image = entry["image"]
            parts.append(f"deletion AUC {_auc(image['deletion_auc'])} (random "
                         f"{_auc(image['random_deletion_auc'])}), insertion AUC "
                         f"{_auc(image['insertion_auc'])} (random "
                         f"{_auc(image['random_insertion_auc'])})")
        if entry.get("words"):
            words = entry["words"]
            parts.append(f"comprehensiveness {_auc(words['comprehensiveness'])} (random "
                         f"{_auc(words['random_comprehensiveness'])}), sufficiency "
                         f"{_auc(words['sufficiency'])} (random "
                         f"{_auc(words['random_sufficiency'])})")
        if parts:
            lines.append(f"{name} faithfulness: " + "; ".join(parts))
    for name, entry in (sections.get("sanity") or {}).items():
        if entry.get("available") is False:
            lines.append(f"{name} sanity check: not available: {entry['reason']}")
            continue
        verdict = "passes" if entry["passes"] else "fails"
        lines.append(f"{name} sanity check: rank correlation with the original map after "
                     f"randomising {len(entry['steps'])} layers: "
                     f"{_auc(entry['final_spearman'])} ({verdict}: threshold "
                     f"{entry['threshold']})")
    return lines
