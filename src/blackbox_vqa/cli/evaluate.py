"""``bbvqa evaluate``: run explanation methods over a data set and report the paper's analyses.

Items are stored in ``--out`` as they finish, so the same command continues an
interrupted run; at the end it writes ``results.json``, ``results.md`` and ``pos.png``
there and prints the tables.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from blackbox_vqa.cli.model_options import ModelSettings, with_model_options_except
from blackbox_vqa.errors import InputError

__all__ = ["evaluate_command"]

RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"
POS_FIGURE = "pos.png"
_QUIET_REPORT_S = 30.0


@with_model_options_except("threads")
@with_method_options
@with_method_choice("methods", "occlusion,guided-bp", "Methods")
def evaluate_command(
    dataset: Annotated[str, typer.Option(help="easyvqa:train, easyvqa:test or vqa.")],
    out: Annotated[Path, typer.Option(help="Run folder: items are stored here as they "
                                      "finish; rerun the same command to continue.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec: easyvqa, "
                                       "package.module:factory, ...")] = "easyvqa",
    methods: str = "occlusion,guided-bp",
    questions: Annotated[Path | None, typer.Option(help="VQA questions JSON (--dataset "
                                                   "vqa).")] = None,
    annotations: Annotated[Path | None, typer.Option(help="VQA annotations JSON (--dataset "
                                                     "vqa).")] = None,
    images: Annotated[Path | None, typer.Option(help="Folder of COCO-named images "
                                                "(--dataset vqa).")] = None,
    hat: Annotated[Path | None, typer.Option(help="Folder of VQA-HAT maps "
                                             "{question_id}_{n}.png.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate N items drawn at random "
                                              "(seeded) instead of all.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the item sample, the random maps and "
                                      "the cross-validation folds.")] = 0,
    workers: Annotated[int, typer.Option(help="Items evaluated in parallel: local "
                                         "processes, or Ray actors.")] = 1,
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    cpus_per_worker: CpusPerWorker = 1.0,
    gpus_per_worker: GpusPerWorker = 0.0,
    ray_working_dir: RayWorkingDir = None,
    shared_fs: SharedFs = False,
    ray_node_ip: RayNodeIp = None,
    threads: Annotated[int, typer.Option(help="Torch CPU threads per process (equal counts "
                                         "give bit-identical results).")] = 1,
    sanity: Annotated[int, typer.Option(help="Run the randomisation sanity check on the "
                                        "first N items (0: none); writes sanity.png.")] = 0,
    folds: Annotated[int, typer.Option(help="Cross-validation folds for failure "
                                       "prediction.")] = 5,
    tagger: Annotated[str, typer.Option(help="Part-of-speech tagger: auto, nltk or "
                                        "pattern.")] = "auto",
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
    *,
    model_settings: ModelSettings,
    method_options: MethodOptions,
) -> None:
    """Explain every item of a data set; report human-attention correlation, words by part
    of speech and failure prediction."""

    from blackbox_vqa.cli.model_options import resolve
    from blackbox_vqa.datasets import open_dataset, select_items
    from blackbox_vqa.evaluation.human_attention import MAP_SIZE
    from blackbox_vqa.evaluation.pos import load_tagger
    from blackbox_vqa.evaluation.runner import EvalConfig
    from blackbox_vqa.evaluation.runstore import RunStore
    from blackbox_vqa.explainers.registry import parse_methods
    from blackbox_vqa.specs import kind_of

    _check_numbers(limit=limit, workers=workers, threads=threads, folds=folds)
    if sanity < 0:
        raise InputError(f"--sanity must be >= 0 (items), got {sanity}")
    run_on = build_executor(executor, workers, {
        "--ray-address": ray_address, "--cpus-per-worker": cpus_per_worker,
        "--gpus-per-worker": gpus_per_worker, "--ray-working-dir": ray_working_dir,
        "--shared-fs": shared_fs, "--ray-node-ip": ray_node_ip})
    method_names = parse_methods(methods, parameter="--methods")
    options = method_options.settings()
    spec, label, model_settings = resolve(model, model_settings)
    if kind_of(spec).threads == "loader":  # torch threads are set per process by the runner
        model_settings = model_settings.with_values(threads=threads)
    model_extra = model_settings.extra(spec)
    pos_tagger = load_tagger(tagger)
    listing = open_dataset(dataset, questions=questions, annotations=annotations,
                           images=images, hat=hat)
    if not listing.items:
        raise InputError(f"data set {listing.name} has no usable items "
                         f"(skipped: {dict(listing.skipped) or 'none'})")
    chosen = select_items(listing.items, limit=limit, seed=seed)
    settings = {
        "model": label, "dataset": dict(listing.identity), "methods": list(method_names),
        "limit": limit, "seed": seed, "grid": options.grid,
        "baseline": options.baseline.strip().lower(), "map_size": MAP_SIZE,
        "items": len(chosen), "threads": threads, "score": options.score,
        **method_options.recorded(method_names),
        "metrics": method_options.metrics, "sanity": sanity,
        **({"window": list(options.window)} if options.window else {}),
        **({"stride": list(options.stride)} if options.stride else {}),
    }
    config = EvalConfig(model=spec, methods=method_names,
                        options=options,
                        seed=seed,
                        threads=threads, model_options=model_extra,
                        metrics=method_options.metrics,
                        sanity_keys=frozenset(item.key for item in chosen[:sanity]))
    with RunStore.open(out, settings) as store:
        run = _run(store, chosen, config, run_on)
        records = list(store.records([item.key for item in chosen]))
    _report(out, records, settings, listing.skipped, pos_tagger, folds, run)


def _check_numbers(
    *, limit: int | None, workers: int, threads: int, folds: int
) -> None:
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    if folds < 2:
        raise InputError(f"--folds must be >= 2, got {folds}")


def _run(store: Any, chosen: Sequence[Any], config: Any, executor: Any) -> dict[str, Any]:
    from blackbox_vqa.cli.progress import stderr_console
    from blackbox_vqa.evaluation.executors.local import LocalExecutor
    from blackbox_vqa.evaluation.runner import load_evaluator

    done = store.done_keys()
    pending = [item for item in chosen if item.key not in done]
    console = stderr_console()
    for note in store.rejected:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"{len(chosen)} items: {len(chosen) - len(pending)} stored earlier, "
                  f"{len(pending)} to evaluate in {store.root}/")
    if pending and isinstance(executor, LocalExecutor) and executor.workers == 1:
        executor.evaluator = load_evaluator(config)
        for name, reason in executor.evaluator.unavailable.items():
            console.print(f"note: {name} skipped: {reason}")
    started = time.perf_counter()
    with _items_bar(len(chosen), len(chosen) - len(pending)) as advance:
        def on_record(record: Any) -> None:
            store.write(record)
            advance()

        executor.run(pending, config, on_record)
    seconds = time.perf_counter() - started
    facts = dict(executor.describe())
    failed = facts.get("items_failed")
    if failed:
        console.print(f"note: {failed} items failed (their Ray workers kept dying); they are "
                      "stored as failed: delete their files under items/ and rerun to redo them")
    return {
        **facts,
        "threads": config.threads,
        "items_this_run": len(pending),
        "seconds_this_run": round(seconds, 3),
        "items_per_second": round(len(pending) / seconds, 4) if pending and seconds > 0 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_worker_mb": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1) or None,
    }


@contextmanager
def _items_bar(total: int, done: int) -> Iterator[Callable[[], None]]:
    """``advance()`` per finished item: a bar with rate and ETA on a terminal, else a line
    on stderr every 30 s."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from blackbox_vqa.cli.progress import stderr_console

    started = time.perf_counter()
    state = {"done": done, "reported": started}

    def rate() -> float:
        elapsed = time.perf_counter() - started
        return (state["done"] - done) / elapsed if elapsed > 0 else 0.0

    if not sys.stderr.isatty():
        def quiet() -> None:
            state["done"] += 1
            now = time.perf_counter()
            if now - state["reported"] >= _QUIET_REPORT_S:
                state["reported"] = now
                speed = rate()
                eta = (total - state["done"]) / speed if speed > 0 else float("inf")
                print(f"evaluate: {int(state['done'])}/{total} items, {speed:.2f} items/s, "
                      f"ETA {eta:.0f} s", file=sys.stderr, flush=True)

        yield quiet
        return
    progress = Progress(
        TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=stderr_console(), transient=True,
    )
    task = progress.add_task("evaluate", total=total, completed=done, rate="")

    def advance() -> None:
        state["done"] += 1
        progress.update(task, advance=1, rate=f"{rate():.2f} items/s")

    with progress:
        yield advance


def _report(
    out: Path, records: list[Any], settings: dict[str, Any], dataset_skipped: Any,
    tagger: Any, folds: int, run: dict[str, Any],
) -> None:
    from blackbox_vqa.evaluation.pos import pos_figure
    from blackbox_vqa.evaluation.summary import markdown, summarize
    from blackbox_vqa.outputs import atomic_write_json, atomic_write_text
    from blackbox_vqa.report.figures import save_figure
    from blackbox_vqa.text import terminal_safe

    results = summarize(records, settings=settings, dataset_skipped=dataset_skipped,
                        tagger=tagger, folds=folds, run=run)
    text = markdown(results)
    atomic_write_json(out / RESULTS_FILE, results)
    atomic_write_text(out / MARKDOWN_FILE, text)
    pos = results["pos"]
    probability = {m: r["probability"] for m, r in pos["methods"].items()}
    chance: dict[str, float | None] = next(
        (r["chance"] for r in pos["methods"].values()), {})
    save_figure(pos_figure([row["tag"] for row in pos["tags"]], probability, chance,
                           title=f"most important word by tag ({pos['tagger']})"),
                out / POS_FIGURE)
    written = [RESULTS_FILE, MARKDOWN_FILE, POS_FIGURE, *_check_figures(out, results)]
    sys.stdout.write(terminal_safe(text, newlines=True))
    sys.stdout.write(f"\nwritten to {terminal_safe(str(out))}/ ({', '.join(written)})\n")


def _check_figures(out: Path, results: dict[str, Any]) -> list[str]:
    """deletion.png and sanity.png, when the run measured them."""
    from blackbox_vqa.report.figures import deletion_figure, sanity_figure, save_figure

    written = []
    faith = results["faithfulness"]["methods"]
    if faith:
        save_figure(deletion_figure({m: e["curves"] for m, e in faith.items()},
                                    title=f"mean of {results['faithfulness']['items']} items"),
                    out / "deletion.png")
        written.append("deletion.png")
    sanity = results["sanity"]["methods"]
    if sanity:
        save_figure(sanity_figure({m: e["per_layer"] for m, e in sanity.items()},
                                  title=f"randomisation, mean of {results['sanity']['items']} "
                                  "items"), out / "sanity.png")
        written.append("sanity.png")
    return written
