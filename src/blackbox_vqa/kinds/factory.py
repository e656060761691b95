"""``package.module:factory[?key=value&...]``: a callable that returns any object with the
model protocol; the current directory is importable, as uvicorn does for apps. Arguments
after ``?`` are passed as keywords (see :func:`blackbox_vqa.specs.factory_arguments`)."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from typing import Any

from blackbox_vqa.errors import ModelLoadError
from blackbox_vqa.kinds.common import THREADS
from blackbox_vqa.specs import ModelKind, ModelOptions, factory_arguments

__all__ = ["KIND"]

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*(\?.*)?$")


def _cwd_importable() -> None:
    """Put the current directory first on ``sys.path`` (as uvicorn does for app specs)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _load_factory(spec: str, options: ModelOptions) -> object:
    target_text, _, query = spec.strip().partition("?")
    arguments = factory_arguments(query)
    module_name, _, attr_path = target_text.partition(":")
    _cwd_importable()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} for model spec {spec!r}: {exc}") \
            from exc
    except Exception as exc:
        raise ModelLoadError(
            f"importing {module_name!r} for model spec {spec!r} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"{module_name!r} has no attribute {attr_path!r} (spec {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ModelLoadError(f"{spec!r} is not callable; a factory returning a model is needed")
    try:
        model = target(**arguments)
    except Exception as exc:
        raise ModelLoadError(f"factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not getattr(model, "name", None):
        with contextlib.suppress(AttributeError, TypeError):
            model.name = spec
    return model


KIND = ModelKind(
    name="factory", syntax="package.module:factory[?key=value]", audience="factory",
    matches=lambda spec: bool(_FACTORY_RE.match(spec)), load=_load_factory,
    options=(THREADS,))
