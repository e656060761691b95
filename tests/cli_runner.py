"""Run ``bbvqa`` in this process, the way the CLI tests do."""

from __future__ import annotations

import contextlib
import io

import pytest

from blackbox_vqa.cli.app import main


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``bbvqa ARGS``: its exit code (it must exit through ``SystemExit``), stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0), out.getvalue(), err.getvalue()
