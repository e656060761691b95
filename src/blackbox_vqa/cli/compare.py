"""``bbvqa compare``: several models explained on the same inputs, side by side.

One image and question (``--image``/``--question``) or ``--limit`` items of a data set
(``--dataset``) drawn with ``--seed`` as ``bbvqa evaluate`` draws them. Every model runs
every method it supports; a method it cannot do is reported as not available, and a model
that fails does not stop the others (the command then exits with code 1 after writing its
outputs). Writes ``DIR/report.html`` and ``DIR/comparison.json`` and prints a table of the
models and the agreement between them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from blackbox_vqa.cli.executor_options import (
    CpusPerWorker,
    ExecutorName,
    GpusPerWorker,
    RayAddress,
    RayNodeIp,
    RayWorkingDir,
    SharedFs,
    build_executor,
)
from blackbox_vqa.cli.method_options import (
    MethodOptions,
    with_method_choice,
    with_method_options,
)
from blackbox_vqa.cli.model_options import ModelSettings, with_model_options
from blackbox_vqa.errors import InputError, ModelError

__all__ = ["SCHEMA", "compare_command"]

SCHEMA = "blackbox_vqa.comparison/1"
MARKER = "comparison.json"
DEFAULT_LIMIT = 20
REPORT_ITEMS = 3


@dataclass(frozen=True)
class _Options:
    """The explainer settings shared by every model of a comparison."""

    methods: tuple[str, ...]
    grid: int
    baseline: str
    batch_size: str
    answer: str | None
    k: int
    shared: MethodOptions = field(default_factory=MethodOptions)

    @property
    def metrics(self) -> bool:
        """Whether each map's faithfulness is measured too."""
        return self.shared.metrics


@with_model_options
@with_method_options
@with_method_choice("methods", None, "Methods (default: each default method the model "
                    "supports)")
def compare_command(
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="Model spec; give it two or more times.")] = None,
    image: Annotated[Path | None, typer.Option("--image", "-i", help="Image file.")] = None,
    question: Annotated[str | None, typer.Option("--question", "-q", help="The question.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Data set instead of one image: easyvqa:train, easyvqa:test or vqa.")] = None,
    limit: Annotated[int | None, typer.Option(
        help=f"Data-set items to compare on, drawn at random (default {DEFAULT_LIMIT}).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data-set item sample (the same "
                                      "items as bbvqa evaluate draws).")] = 0,
    questions: Annotated[Path | None, typer.Option(help="VQA questions JSON.")] = None,
    annotations: Annotated[Path | None, typer.Option(help="VQA annotations JSON.")] = None,
    images: Annotated[Path | None, typer.Option(help="Folder of VQA (COCO) images.")] = None,
    hat: Annotated[Path | None, typer.Option(help="Folder of VQA-HAT attention maps.")] = None,
    methods: str | None = None,
    answer: Annotated[str | None, typer.Option(
        help="Explain this answer for every model (it must be in every vocabulary).")] = None,
    top_k: Annotated[int, typer.Option(help="Cells (of 14x14) in the top-k overlap.")] = 10,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: a new folder "
                                             "named after the question).")] = None,
    force: Annotated[bool, typer.Option(help="Allow --out to hold an earlier "
                                        "comparison.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print comparison.json to "
                                          "stdout.")] = False,
    workers: Annotated[int, typer.Option(help="--dataset: items compared in parallel: "
                                         "local processes, or Ray actors.")] = 1,
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    cpus_per_worker: CpusPerWorker = 1.0,
    gpus_per_worker: GpusPerWorker = 0.0,
    ray_working_dir: RayWorkingDir = None,
    shared_fs: SharedFs = False,
    ray_node_ip: RayNodeIp = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
    *,
    model_settings: ModelSettings,
    method_options: MethodOptions,
) -> None:
    """Explain several models on the same inputs and show how much they agree."""
    from blackbox_vqa.explainers.registry import default_methods, parse_methods

    specs = _check_specs(model or [])
    single = _check_mode(image, question, dataset, limit,
                         {"--questions": questions, "--annotations": annotations,
                          "--images": images, "--hat": hat})
    if not 1 <= top_k <= 14 * 14:
        raise InputError(f"--top-k must be in [1, 196] (cells of the 14x14 map), got {top_k}")
    names = parse_methods(methods, parameter="--methods") if methods else default_methods()
    method_options.settings()  # method settings checked before any model loads
    settings = _Options(methods=names, grid=method_options.grid,
                        baseline=method_options.baseline,
                        batch_size=method_options.batch_size, answer=answer, k=top_k,
                        shared=method_options)
    resolved = _resolve(specs, model_settings)
    run_on = None
    if executor.strip().lower() != "local" or workers != 1:
        if single:
            raise InputError("--executor and --workers only apply with --dataset")
        run_on = build_executor(executor, workers, {
            "--ray-address": ray_address, "--cpus-per-worker": cpus_per_worker,
            "--gpus-per-worker": gpus_per_worker, "--ray-working-dir": ray_working_dir,
            "--shared-fs": shared_fs, "--ray-node-ip": ray_node_ip})
    else:
        build_executor(executor, workers, {  # refuses Ray options without --executor ray
            "--ray-address": ray_address, "--cpus-per-worker": cpus_per_worker,
            "--gpus-per-worker": gpus_per_worker, "--ray-working-dir": ray_working_dir,
            "--shared-fs": shared_fs, "--ray-node-ip": ray_node_ip})
    if single and image is not None and question is not None:
        doc = _compare_image(resolved, image, question, settings, out, force, show=not as_json)
    else:
        doc = _compare_dataset(resolved, dataset or "", (limit or DEFAULT_LIMIT, seed),
                               settings, out, force,
                               {"questions": questions, "annotations": annotations,
                                "images": images, "hat": hat}, show=not as_json,
                               executor=run_on, model_threads=model_settings.threads)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    _raise_failures(doc)


def _check_specs(specs: Sequence[str]) -> list[str]:
    cleaned = [spec.strip() for spec in specs]
    if len(cleaned) < 2:
        raise InputError(f"compare needs at least two --model options, got {len(cleaned)}")
    seen: set[str] = set()
    for spec in cleaned:
        if spec in seen:
            raise InputError(f"--model {spec!r} is given twice; give each model once")
        seen.add(spec)
    return cleaned


def _check_mode(
    image: Path | None,
    question: str | None,
    dataset: str | None,
    limit: int | None,
    files: dict[str, Path | None],
) -> bool:
    """True for one image and question, False for a data set; InputError for a mix."""
    given_files = [name for name, value in files.items() if value is not None]
    if dataset is not None:
        if image is not None or question is not None:
            raise InputError("give either --dataset or --image with --question, not both")
        if limit is not None and limit < 1:
            raise InputError(f"--limit must be >= 1, got {limit}")
        return False
    if limit is not None or given_files:
        options = ", ".join((["--limit"] if limit is not None else []) + given_files)
        raise InputError(f"{options} only apply with --dataset")
    if image is None or question is None:
        raise InputError("give --image and --question (or --dataset)")
    return True


def _resolve(texts: Sequence[str], settings: ModelSettings) -> list[tuple[str, str, Any]]:
    """``(--model text, label, its settings)`` per model; labels must be unique, and every
    model option given must be usable by at least one model."""
    from blackbox_vqa.cli.model_options import resolve

    found = [(text, *resolve(text, settings)[1:]) for text in texts]
    labels = [label for _, label, _ in found]
    for label in labels:
        if labels.count(label) > 1:
            raise InputError(f"two models would both be shown as {label!r}; give each "
                             "model once")
    settings.refuse_unusable([resolve(text, settings)[0] for text in texts])
    return found


def _method_settings(options: _Options) -> Any:
    return options.shared.settings()


def _load_models(resolved: Sequence[tuple[str, str, Any]], options: _Options) \
        -> dict[str, Any]:
    """label -> an Explainer of that model with the comparison's methods and settings."""
    from blackbox_vqa.cli.model_options import load
    from blackbox_vqa.comparison import check_shared_answer
    from blackbox_vqa.explain import Explainer

    settings = _method_settings(options)
    explainers = {}
    for text, label, model_settings in resolved:
        loaded = load(text, model_settings, strict=False)
        explainers[label] = Explainer(loaded.model, methods=options.methods,
                                      settings=settings, label=label)
    check_shared_answer(options.answer, {label: e.model for label, e in explainers.items()})
    return explainers


def _output_folder(out: Path | None, name: str, force: bool) -> Path:
    """The output folder, checked before any work (it is written only at the end)."""
    from blackbox_vqa.outputs import check_output_dir, new_output_dir, slugify

    folder = out if out is not None else new_output_dir(Path.cwd(),
                                                        f"bbvqa-compare-{slugify(name)}")
    return check_output_dir(folder, force=force, marker=MARKER)


def _write(folder: Path, force: bool, report: Any, doc: dict[str, Any]) -> None:
    """Write report.html and comparison.json; the folder appears whole or not at all."""
    from blackbox_vqa.outputs import atomic_write_json, staged_output_dir
    from blackbox_vqa.report.html import write_report

    with staged_output_dir(folder, force=force, marker=MARKER) as stage:
        write_report(stage / "report.html", report)
        atomic_write_json(stage / MARKER, doc)


def _run_all(
    models: dict[str, Any], pixels: Any, question: str, image_path: str,
    options: _Options, label: str = "",
) -> list[Any]:
    from blackbox_vqa.comparison import explain_model

    runs = [explain_model(spec, explainer, pixels, question, image_path=image_path,
                          answer=options.answer, progress=_progress(f"{label}{spec}"))
            for spec, explainer in models.items()]
    if options.metrics:
        runs = [_with_metrics(run, models[run.spec], pixels, options) for run in runs]
    return runs


def _with_metrics(run: Any, explainer: Any, pixels: Any, options: _Options) -> Any:
    """The run with its explanation's ``metrics`` section (a failed run as it is)."""
    from blackbox_vqa.comparison import with_metrics

    return with_metrics(run, explainer.model, pixels, baseline=options.baseline,
                        batch_size=options.batch_size)


def _progress(prefix: str) -> Callable[[str], Any]:
    from blackbox_vqa.cli.progress import progress_bar

    @contextmanager
    def factory(method: str) -> Iterator[Callable[[int, int], None]]:
        with progress_bar(f"{prefix} {method}") as update:
            yield update

    return factory


def _header(settings: Any) -> dict[str, Any]:
    from datetime import datetime, timezone

    from blackbox_vqa.version import __version__

    return {
        "schema": SCHEMA,
        "settings": {"methods": list(settings.methods), "grid": settings.grid,
                     "baseline": settings.baseline, "batch_size": settings.batch_size,
                     "answer": settings.answer, "top_k": settings.k,
                     "score": settings.shared.score, "metrics": settings.metrics,
                     **settings.shared.recorded(settings.methods)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
    }


def _footer(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, str(doc[key])) for key in ("created", "version", "schema")]


def _compare_image(
    resolved: list[tuple[str, str, Any]], image: Path, question: str, settings: _Options,
    out: Path | None, force: bool, *, show: bool,
) -> dict[str, Any]:
    from blackbox_vqa.comparison import pair_dict, pair_results, run_dict, shared_answers
    from blackbox_vqa.images import load_image
    from blackbox_vqa.report.compare_views import comparison_report
    from blackbox_vqa.text import validate_question

    question = validate_question(question)
    pixels = load_image(image)
    folder = _output_folder(out, question, force)
    models = _load_models(resolved, settings)
    info = {"path": str(image), "width": int(pixels.shape[1]), "height": int(pixels.shape[0])}
    runs = _run_all(models, pixels, question, str(image), settings)
    pairs = pair_results(runs, k=settings.k, answer_given=settings.answer is not None)
    shared = shared_answers([run.answers for run in runs if run.explanation is not None])
    doc = {
        **_header(settings), "mode": "image", "question": question, "image": info,
        "shared_answers": list(shared),
        "models": [run_dict(run, shared) for run in runs],
        "agreement": [pair_dict(pair) for pair in pairs],
    }
    _write(folder, force, comparison_report(
        runs, question, pixels, str(image), k=settings.k, footer=_footer(doc)), doc)
    if show:
        _print_image(runs, pairs, shared, folder)
    return doc


def _compare_dataset(
    resolved: list[tuple[str, str, Any]], dataset: str, sample: tuple[int, int],
    settings: _Options, out: Path | None, force: bool, files: dict[str, Path | None], *,
    show: bool, executor: Any = None, model_threads: int | None = None,
) -> dict[str, Any]:
    from blackbox_vqa.comparison import (
        dataset_summary,
        item_result,
        pair_dict,
        run_dict,
        shared_answers,
    )
    from blackbox_vqa.datasets import human_maps, open_dataset, select_items
    from blackbox_vqa.errors import ImageError
    from blackbox_vqa.images import load_image
    from blackbox_vqa.report.compare_views import dataset_report

    listing = open_dataset(dataset, **files)
    count, seed = sample
    folder = _output_folder(out, dataset, force)
    chosen = select_items(listing.items, limit=count, seed=seed)
    results: list[Any] = []
    shown: list[tuple[Any, Any]] = []
    unreadable = 0
    if executor is not None:
        specs = [label for _, label, _ in resolved]
        found = _run_executor(executor, resolved, settings, chosen, model_threads)
        for item in chosen:
            result = found[item.key]
            if result is None:
                unreadable += 1
                continue
            results.append(result)
            if len(shown) < REPORT_ITEMS:
                shown.append((result, load_image(item.image)))
    else:
        models = _load_models(resolved, settings)
        specs = list(models)
        for item in chosen:
            try:
                pixels = load_image(item.image)
            except ImageError:
                unreadable += 1
                continue
            runs = _run_all(models, pixels, item.question, str(item.image), settings,
                            f"{item.key} ")
            result = item_result(item, runs, human_maps(item, pixels), k=settings.k,
                                 answer_given=settings.answer is not None)
            results.append(result)
            if len(shown) < REPORT_ITEMS:
                shown.append((result, pixels))
    summary = dataset_summary(results, specs)
    skipped = dict(listing.skipped)
    if unreadable:
        skipped["unreadable image"] = unreadable
    doc = {
        **_header(settings), "mode": "dataset",
        "dataset": {"name": listing.name, "limit": count, "seed": seed, "items": len(results),
                    "skipped": skipped, "has_maps": listing.has_maps},
        "summary": summary,
        "items": [{
            "key": r.key, "question": r.question, "image": r.image, "reference": r.reference,
            "models": [{**run_dict(run, shared_answers([run.answers]), full=False),
                        "correct": r.correct.get(run.spec),
                        "human_attention": dict(r.human.get(run.spec, {}))}
                       for run in r.runs],
            "agreement": [pair_dict(p) for p in r.pairs],
        } for r in results],
    }
    notes = [f"{listing.name}: {len(results)} items drawn with seed {seed}"
             + (f"; skipped: {skipped}" if skipped else "")]
    _write(folder, force, dataset_report(
        "bbvqa compare: " + " vs ".join(specs) + f" on {listing.name}", summary, shown,
        k=settings.k, notes=notes, footer=_footer(doc)), doc)
    if show:
        _print_dataset(summary, folder)
    return doc


def _run_executor(
    executor: Any, resolved: Sequence[tuple[str, str, Any]], options: _Options,
    items: Sequence[Any], threads: int | None,
) -> dict[str, Any]:
    """key -> ItemResult (None: unreadable image), every model loaded once per worker."""
    from blackbox_vqa.cli.model_options import resolve
    from blackbox_vqa.comparison import CompareConfig, CompareModel

    models = []
    for text, label, model_settings in resolved:
        spec = resolve(text, model_settings)[0]
        models.append(CompareModel(label, spec, model_settings.extra(spec, strict=False)))
    config = CompareConfig(
        models=tuple(models), methods=options.methods, settings=_method_settings(options),
        answer=options.answer, k=options.k, threads=threads, metrics=options.metrics)
    found: dict[str, Any] = {}

    def on_result(result: tuple[str, Any]) -> None:
        found[result[0]] = result[1]

    executor.run(items, config, on_result)
    return found


def _raise_failures(doc: dict[str, Any]) -> None:
    entries = doc.get("models") or [m for item in doc.get("items", []) for m in item["models"]]
    failed = [m for m in entries if m["status"] == "failed"]
    if failed:
        first = failed[0]
        raise ModelError(
            f"{len(failed)} of {len(entries)} model runs failed (first: {first['spec']}: "
            f"{first['error']}); the others are in report.html and comparison.json"
        )


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _print_image(runs: Sequence[Any], pairs: Sequence[Any], shared: Sequence[str],
                 folder: Path) -> None:
    from rich.table import Table

    from blackbox_vqa.comparison import (
        best_shared_answer,
        free_text,
        modality_share,
        shared_answers,
        top_words,
    )

    console = _console()
    ok = [run for run in runs if run.explanation is not None]
    differ = len({frozenset(run.answers) for run in ok}) > 1 and len(shared) > 0
    shares = any(modality_share(run) is not None for run in runs)
    table = Table(title="models")
    for column in ("model", "answer", "probability", "top words", "flips", "time"):
        table.add_column(column, justify="right" if column in ("probability", "time") else
                         "left")
    if shares:
        table.add_column("T-SHAP / V-SHAP (mm-shap)")
    if differ:
        table.add_column(f"best of {len(shared)} shared answers")
    for run in runs:
        row = _row(run, differ, best_shared_answer(run, shared), top_words(run))
        if shares:
            row.insert(6, _share_cell(modality_share(run)))
        table.add_row(*row)
    console.print(table)
    texts = [run.spec for run in ok if free_text(run)]
    if texts:
        console.print(_text(f"free-text answers ({', '.join(texts)}): 'same answer' compares "
                            "the answers explained, normalised, wherever one of the pair "
                            "answers in free text"))
    fixed = [run for run in ok if not free_text(run)]
    if len({frozenset(run.answers) for run in fixed}) > 1:
        sizes = ", ".join(f"{run.spec} {len(run.answers)}" for run in fixed)
        common = len(shared_answers([run.answers for run in fixed]))
        console.print(_text(f"answer vocabularies differ ({sizes}; {common} shared by "
                            "all); 'same answer' compares each pair's best shared answers"))
    for run in runs:
        for method, reason in run.unavailable.items():
            console.print(_text(f"{run.spec}: {method} not available: {reason}"))
    if pairs:
        agreement = Table(title="agreement between models")
        for column in ("models", "method", "rank corr (14x14)", f"top-{pairs[0].agreement.k} "
                       "overlap", "same top word", "same answer"):
            agreement.add_column(column)
        for pair in pairs:
            agreement.add_row(*_pair_row(pair))
        console.print(agreement)
    console.print(_text(f"written to {folder}/ (report.html, {MARKER})"))


def _signed(value: float) -> str:
    """An importance in 3 decimals, or in scientific notation under 0.001 (the drops of a
    tiny sequence probability would all read +0.000)."""
    return f"{value:+.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:+.2e}"


def _row(run: Any, differ: bool, best: Any, words: Sequence[tuple[str, float]]) -> list[Any]:
    from rich.text import Text

    from blackbox_vqa.explanation import probability_text

    found = run.explanation
    if found is None:
        cells = [_text(run.spec), _text(f"failed: {run.error}"), Text(""), Text(""), Text(""),
                 Text(f"{run.seconds:.2f} s")]
    else:
        occlusion = found.attribution("occlusion")
        flips = None if occlusion is None else occlusion.extras["flips"]
        cells = [
            _text(run.spec), _text(found.answer), Text(probability_text(found.probability)),
            _text(", ".join(f"{w} {_signed(v)}" for w, v in words)),
            Text("n/a" if flips is None else f"{flips['image']}/{flips['image_total']} cells, "
                 f"{flips['words']}/{flips['words_total']} words"),
            Text(f"{run.seconds:.2f} s"),
        ]
    if differ:
        cells.append(_text("-" if best is None else f"{best[0]} {best[1]:.3f}"))
    return cells


def _share_cell(share: Any) -> Any:
    """``T-SHAP ± s.e. / V-SHAP`` of one run (``n/a`` when MM-SHAP did not run)."""
    from rich.text import Text

    if share is None or share["t_shap"] is None:
        return Text("n/a" if share is None else "undefined")
    se = "" if share["t_shap_se"] is None else f" ± {share['t_shap_se']:.3f}"
    return Text(f"{share['t_shap']:.3f}{se} / {share['v_shap']:.3f}")


def _text(value: object) -> Any:
    """Text from outside (labels, answers, messages) as a Rich Text, control characters
    escaped."""
    from rich.text import Text

    from blackbox_vqa.text import terminal_safe

    return Text(terminal_safe(str(value)))


def _fmt(value: float | bool | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "n/a" if value != value else f"{value:.3f}"


def _pair_row(pair: Any) -> list[Any]:
    from rich.text import Text

    found = pair.agreement
    return [_text(f"{pair.a} / {pair.b}"), Text(pair.method), Text(_fmt(found.rank_correlation)),
            Text(_fmt(found.top_k_overlap)), Text(_fmt(found.same_top_word)),
            Text(_fmt(pair.same_answer))]


def _print_dataset(summary: dict[str, Any], folder: Path) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    table = Table(title=f"models ({summary['items']} items)")
    shares = any("modality_share" in entry for entry in summary["models"].values())
    for column in ("model", "accuracy", "judged", "failed", "human attention (rank corr)"):
        table.add_column(column)
    if shares:
        table.add_column("T-SHAP (mm-shap, mean ± s.e.)")
    for spec, entry in summary["models"].items():
        human = ", ".join(f"{method} {_fmt(est['mean'])} ± {_fmt(est['sem'])}"
                          for method, est in entry["human_attention"].items())
        row = [_text(spec), Text(_fmt(entry["accuracy"])), Text(str(entry["judged"])),
               Text(str(entry["failed"])), Text(human or "n/a")]
        if shares:
            share = (entry.get("modality_share") or {}).get("t_shap")
            row.append(Text("n/a" if share is None else
                            f"{_fmt(share['mean'])} ± {_fmt(share['sem'])}"))
        table.add_row(*row)
    console.print(table)
    if summary["agreement"]:
        agreement = Table(title="mean agreement between models")
        for column in ("models", "method", "items", "rank corr", "top-k overlap",
                       "same top word", "same answer"):
            agreement.add_column(column)
        for entry in summary["agreement"]:
            agreement.add_row(_text(f"{entry['a']} / {entry['b']}"), Text(entry["method"]),
                              Text(str(entry["n"])), Text(_fmt(entry["rank_correlation"])),
                              Text(_fmt(entry["top_k_overlap"])),
                              Text(_fmt(entry["same_top_word"])),
                              Text(_fmt(entry["same_answer"])))
        console.print(agreement)
    console.print(_text(f"written to {folder}/ (report.html, {MARKER})"))
