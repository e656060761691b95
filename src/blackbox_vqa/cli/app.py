"""The ``bbvqa`` command line: a Typer app, one module per command.

``main()`` runs the app and turns every error into one line on stderr and an exit code:
``2`` for bad usage or input, ``1`` for a model failure or an unexpected error. With
``--debug`` anywhere on the command line the traceback is shown as well.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

import typer

from blackbox_vqa.cli.option_groups import refresh_option_groups
from blackbox_vqa.errors import BlackboxVQAError

__all__ = ["app", "main"]

INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT)."""

app = typer.Typer(
    name="bbvqa",
    help="Explain Visual Question Answering models: which image regions and which words "
    "made the model answer as it did.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _error(message: str) -> None:
    from blackbox_vqa.text import terminal_safe

    first = terminal_safe(" ".join(str(message).split())) or "unknown error"
    print(f"bbvqa: error: {first}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``bbvqa`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        refresh_option_groups()  # options of methods registered since the last run
        result = app(args=args, prog_name="bbvqa", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _error("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        _error("interrupted")
        sys.exit(INTERRUPTED)
    except BlackboxVQAError as exc:
        if debug:
            traceback.print_exc()
        _error(str(exc))
        sys.exit(exc.exit_code)
    except Exception as exc:
        if _is_usage_error(exc):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if debug:
            traceback.print_exc()
        _error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        sys.exit(1)
    # Typer returns the exit code instead of raising for --help and similar, and turns
    # Ctrl-C into exit code 130 without a word: say it.
    if result == INTERRUPTED:
        _error("interrupted")
    sys.exit(result if isinstance(result, int) else 0)


def _is_usage_error(exc: BaseException) -> bool:
    """Click-style usage errors (Typer's own or click's) know how to show themselves."""
    return callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)


# Commands register here; each module keeps its heavy imports inside its function.
from blackbox_vqa.cli import explain, train  # noqa: E402

app.command("explain")(explain.explain_command)
app.command("train")(train.train_command)

from blackbox_vqa.cli import serve  # noqa: E402

app.command("serve")(serve.serve_command)

from blackbox_vqa.cli import evaluate  # noqa: E402

app.command("evaluate")(evaluate.evaluate_command)

from blackbox_vqa.cli import compare  # noqa: E402

app.command("compare")(compare.compare_command)

from blackbox_vqa.cli import export  # noqa: E402

app.command("export")(export.export_command)
