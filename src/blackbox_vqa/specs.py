"""Model specs on the command line: which adapter a ``--model SPEC`` string means.

Kinds: ``easyvqa`` (the built-in reference model), ``path.onnx``, an exported PyTorch
graph file, ``http://host:port[/path]``, ``hf:PATH_OR_ID`` (a Hugging Face
``transformers`` VQA model: a ``save_pretrained`` folder, or a hub id where the hub is
reachable), and ``package.module:factory`` (a callable that returns any object with the
model protocol; the current directory is importable, as uvicorn does for apps). A factory
takes keyword arguments after ``?``: ``pkg.mod:make?size=64&name=small`` calls
``make(size=64, name="small")`` (values that read as an int, a float, ``true``/``false``
or ``none`` are converted; anything else is a string). Each kind has one loader in
``LOADERS``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from blackbox_vqa.adapters.base import VQAModel, check_model
from blackbox_vqa.errors import InputError, ModelLoadError, NotSupportedError

__all__ = [
    "LOADERS",
    "ModelOptions",
    "factory_arguments",
    "load_model",
    "public_spec",
    "spec_kind",
]

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*(\?.*)?$")
GRAPH_SUFFIXES = (".pt2", ".ts", ".torchscript")


@dataclass(frozen=True)
class ModelOptions:
    """Options some spec kinds need (third-party ONNX files, HTTP endpoints...).

    ``extra`` carries kind-specific settings by name; loaders ignore what they do not use.
    """

    extra: Mapping[str, Any] = field(default_factory=dict)


def public_spec(spec: str) -> str:
    """``spec`` as it may be shown or written to an output: an ``http(s)://`` spec without
    user name, password, query or fragment (any may hold a secret); others unchanged.

    ``http://user:tok@host:8000/m?key=k`` -> ``http://host:8000/m``. A URL too broken to
    split loses everything before its last ``@`` and after its first ``?`` or ``#``.
    """
    text = spec.strip()
    if not text.lower().startswith(("http://", "https://")):
        return spec
    try:
        parts = urllib.parse.urlsplit(text)
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        scheme, _, rest = text.partition("://")
        rest = re.split(r"[?#]", rest, maxsplit=1)[0]
        authority, slash, path = rest.partition("/")
        return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def spec_kind(spec: str) -> str:
    """``"easyvqa"``, ``"onnx"``, ``"graph"``, ``"http"``, ``"hf"`` or ``"factory"``; else
    InputError."""
    text = spec.strip()
    lower = text.lower()
    if lower == "easyvqa":
        return "easyvqa"
    if lower.startswith("hf:"):
        if not text[3:].strip():
            raise InputError(f"model spec {spec!r} names no model; use hf:PATH_OR_ID")
        return "hf"
    if lower.startswith(("http://", "https://")):
        return "http"
    if lower.endswith(".onnx"):
        return "onnx"
    if lower.endswith(GRAPH_SUFFIXES):
        return "graph"
    if _FACTORY_RE.match(text):
        return "factory"
    raise InputError(
        f"model spec {spec!r} is not one of: easyvqa, PATH.onnx, PATH.pt2/.ts (exported "
        "graph), http://host:port[/path], hf:PATH_OR_ID, package.module:factory[?key=value]"
    )


def _load_easyvqa(spec: str, options: ModelOptions) -> object:
    from blackbox_vqa.models.reference import reference_adapter

    return reference_adapter()


def factory_arguments(query: str) -> dict[str, Any]:
    """``"size=64&name=small"`` -> ``{"size": 64, "name": "small"}`` (see the module doc)."""
    arguments: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise InputError(
                f"factory argument {part!r} is not key=value with a Python name as the key"
            )
        arguments[key] = _argument_value(value.strip())
    return arguments


def _argument_value(text: str) -> Any:
    lower = text.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower == "none":
        return None
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


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


def _load_http(spec: str, options: ModelOptions) -> object:
    try:
        from blackbox_vqa.adapters.http.endpoint import HttpAdapter
    except ImportError as exc:
        raise NotSupportedError(f"http:// models need httpx ({exc}); install the extra: "
                                "pip install 'blackbox-vqa[serve]'") from exc
    return HttpAdapter.from_options(spec, options.extra)


def _load_onnx(spec: str, options: ModelOptions) -> object:
    from blackbox_vqa.adapters.hf.onnx import HfOnnxAdapter, is_hf_export
    from blackbox_vqa.adapters.onnx.runtime import OnnxAdapter

    if is_hf_export(spec.strip()):  # a multi-input graph described by its metadata
        return HfOnnxAdapter.from_options(spec.strip(), options.extra)
    return OnnxAdapter.from_options(spec.strip(), options.extra)


def _load_graph(spec: str, options: ModelOptions) -> object:
    from blackbox_vqa.adapters.torch.graph import GraphAdapter

    return GraphAdapter(spec.strip())


def _load_hf(spec: str, options: ModelOptions) -> object:
    from blackbox_vqa.adapters.hf.vqa import HfAdapter

    location = spec.strip()[3:].strip()
    if _is_generative_folder(location):
        from blackbox_vqa.adapters.hf.generative import GenerativeAdapter

        extra = {k: options.extra[k] for k in ("prompt", "max_tokens", "device")
                 if options.extra.get(k) is not None}
        return GenerativeAdapter.from_pretrained(
            location, answers_file=options.extra.get("answers_file"),
            trust_remote_code=bool(options.extra.get("trust_remote_code")), **extra,
        )
    generative_only = (options.extra.get("prompt"), options.extra.get("max_tokens"))
    if options.extra.get("strict", True) and any(v is not None for v in generative_only):
        raise InputError(f"--prompt and --max-tokens are for http:// (openai) and generative "
                         f"hf: models, not for {spec!r}")
    return HfAdapter.from_pretrained(
        spec.strip()[3:].strip(),
        answers_file=options.extra.get("answers_file"),
        device=options.extra.get("device"),
    )


def _is_generative_folder(location: str) -> bool:
    """Whether a local hf: folder's config.json names a generative image-text-to-text
    architecture or remote code (read as JSON: no code runs)."""
    import json
    from pathlib import Path

    path = Path(location).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    from types import SimpleNamespace

    from blackbox_vqa.adapters.hf.generative import is_generative_vlm

    if config.get("auto_map"):  # remote code: the generative loader refuses it unless trusted
        return True
    return is_generative_vlm(SimpleNamespace(**config))


def _not_yet(kind: str) -> Callable[[str, ModelOptions], object]:
    def load(spec: str, options: ModelOptions) -> object:
        raise NotSupportedError(f"model spec {spec!r} ({kind}) is not supported yet")

    return load


LOADERS: dict[str, Callable[[str, ModelOptions], object]] = {
    "easyvqa": _load_easyvqa,
    "factory": _load_factory,
    "onnx": _load_onnx,
    "graph": _load_graph,
    "http": _load_http,
    "hf": _load_hf,
}


def load_model(spec: str, options: ModelOptions | None = None) -> VQAModel:
    """Load the model a spec names and check it has the model protocol."""
    kind = spec_kind(spec)
    model = LOADERS[kind](spec, options or ModelOptions())
    return check_model(model, source=f"model spec {spec!r}")
