"""``bbvqa train``: reproduce the built-in reference model from a fixed seed.

Trains the CNN + LSTM network on the easy-VQA train split (from the ``easy-vqa``
package), reports its accuracy on every test question, and writes ``easyvqa.pt`` and
``easyvqa.json`` into a new folder (``--out`` to choose it). The shipped weights are
never replaced silently: a folder that already holds weights needs ``--force``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from blackbox_vqa.errors import InputError

__all__ = ["train_command"]

WEIGHTS_MARKER = "easyvqa.pt"
DEFAULT_OUT_NAME = "easyvqa-weights"


def train_command(
    epochs: Annotated[int | None, typer.Option(
        help="Passes over the train split (default: the shipped model's).")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Random seed (default: the shipped model's).")] = None,
    out: Annotated[Path | None, typer.Option(
        help=f"Folder for easyvqa.pt and easyvqa.json (default: a new ./{DEFAULT_OUT_NAME}"
        " folder).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Use only the first N train and test questions (smoke tests).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch (default: torch's choice). The same seed and thread "
        "count give the same weights; the shipped ones used 1 thread.")] = None,
    force: Annotated[bool, typer.Option(
        help="Allow --out to hold earlier weights (they are replaced).")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Train the reference easy-VQA model and print its test accuracy."""
    from blackbox_vqa.cli.progress import progress_bar, stderr_console
    from blackbox_vqa.models.training import (
        DEFAULT_EPOCHS,
        DEFAULT_SEED,
        StepInfo,
        TrainConfig,
        save_weights,
        train_reference_model,
    )
    from blackbox_vqa.outputs import new_output_dir, prepare_output_dir

    for name, value in (("--epochs", epochs), ("--limit", limit), ("--threads", threads)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    config = TrainConfig(
        epochs=DEFAULT_EPOCHS if epochs is None else epochs,
        seed=DEFAULT_SEED if seed is None else seed,
        limit=limit,
        threads=threads,
    )
    # Check the output folder before spending minutes on training.
    target = out if out is not None else new_output_dir(".", DEFAULT_OUT_NAME)
    target = prepare_output_dir(target, force=force, marker=WEIGHTS_MARKER)
    console = stderr_console()
    console.print(
        f"training the easy-VQA reference model: {config.epochs} epochs, seed {config.seed}"
        + (f", first {limit} questions" if limit else "")
    )

    with progress_bar("training") as update:

        def report(info: StepInfo) -> None:
            update(info.step, info.total_steps)
            if info.epoch_done:
                console.print(
                    f"epoch {info.epoch}/{info.epochs}: loss {info.epoch_loss:.4f}, "
                    f"train accuracy {info.epoch_accuracy:.4f}"
                )

        result = train_reference_model(config, progress=report)
    weights = save_weights(result, target, overwrite=True)
    sys.stdout.write(
        f"test accuracy: {result.test_accuracy:.4f} "
        f"({round(result.test_accuracy * result.test_items)}/{result.test_items} questions)\n"
        f"training time: {result.seconds:.0f} s, {result.steps} steps, {result.threads} threads\n"
        f"weights: {weights}\n"
    )
