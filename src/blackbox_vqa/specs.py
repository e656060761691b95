"""Model specs on the command line: which kind of model a ``--model SPEC`` string means.

Each kind is one :class:`ModelKind` entry: a matcher for specs, a loader, and the options it
reads (:class:`KindOption`, declared once: the command line builds a flag for each, and model
files accept the same names). The built-in kinds live in :mod:`blackbox_vqa.kinds`, one
module each: ``easyvqa`` (the built-in reference model), ``hf:PATH_OR_ID`` (Hugging Face
``transformers`` models), ``http://host:port[/path]``, ``path.onnx``, an exported PyTorch
graph file, and ``package.module:factory[?key=value]`` (a callable that returns any object
with the model protocol; the current directory is importable, as uvicorn does for apps).
Packages add kinds through the ``blackbox_vqa.model_kinds`` entry-point group (an entry point
names a module that calls :func:`register_kind`), or by calling it directly.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from blackbox_vqa.adapters.base import VQAModel, check_model
from blackbox_vqa.errors import InputError

__all__ = [
    "KIND_ENTRY_POINT_GROUP",
    "KindOption",
    "ModelKind",
    "ModelOptions",
    "factory_arguments",
    "kind_of",
    "kind_options",
    "load_model",
    "model_kinds",
    "public_spec",
    "register_kind",
    "spec_kind",
    "unregister_kind",
]

KIND_ENTRY_POINT_GROUP = "blackbox_vqa.model_kinds"
_BUILTIN_KINDS = "blackbox_vqa.kinds"
GRAPH_SUFFIXES = (".pt2", ".ts", ".torchscript")


@dataclass(frozen=True)
class ModelOptions:
    """The options a kind's loader reads, by :class:`KindOption` name (``extra``); a loader
    ignores what it does not declare."""

    extra: Mapping[str, Any] = field(default_factory=dict)


OptionType = type | Any


@dataclass(frozen=True)
class KindOption:
    """One model option: declared once, read by every kind that lists it.

    Attributes:
        name: the key in :class:`ModelOptions` and in model files (``http_timeout``).
        type: ``str``, ``int``, ``float``, ``Path``, ``bool`` (a flag) or ``list[str]``
            (repeatable).
        help: the ``--help`` line.
        flag: the option without ``--`` (default: ``name`` with ``-`` for ``_``).
        check: ``check(value)`` raises :class:`InputError` for a bad value.
        audience: who may use it, for the refusal (default: the kinds that list it).
    """

    name: str
    type: OptionType
    help: str
    flag: str | None = None
    check: Callable[[Any], None] | None = None
    audience: str | None = None

    @property
    def option(self) -> str:
        """The command-line option, ``--flag``."""
        return "--" + (self.flag or self.name.replace("_", "-"))

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` from a model file, type-checked (InputError naming ``where``)."""
        if self.type in (list[str], tuple[str, ...]):
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                raise InputError(f"{where}: {self.name} must be a string or a list of strings, "
                                 f"got {value!r}")
            return tuple(items)
        kinds: dict[Any, tuple[type, ...]] = {str: (str,), Path: (str,), int: (int,),
                                               float: (int, float), bool: (bool,)}
        ok = isinstance(value, kinds.get(self.type, (object,))) and \
            (self.type is bool or not isinstance(value, bool))
        if not ok:
            raise InputError(f"{where}: {self.name} must be {_type_name(self.type)}, got "
                             f"{value!r}")
        return float(value) if self.type is float else value


def _type_name(kind: OptionType) -> str:
    return {str: "a string", Path: "a path (a string)", int: "an integer",
            float: "a number", bool: "true or false"}.get(kind, str(kind))


@dataclass(frozen=True)
class ModelKind:
    r"""A registry entry: one kind of ``--model`` spec.

    Attributes:
        name: short name (``"onnx"``), unique.
        syntax: the spec's form for messages (``"PATH.onnx"``).
        audience: the models it names in refusals (``".onnx"`` in "only for .onnx models").
        matches: ``matches(spec) -> bool``; the first registered kind that matches wins.
        load: ``load(spec, options) -> model`` (any object with the model protocol).
        options: the :class:`KindOption`\ s its loader reads.
        threads: how ``--threads`` applies: ``"torch"`` (the command sets torch's threads),
            ``"loader"`` (passed to the loader as the ``threads`` option) or ``"none"`` (a
            model that does not run here).
        adapters: modules of the adapters it loads (a model passed from Python is matched
            to its kind by its class's module).
        no_gradients: what such a model is, when it offers no gradients ("" when it may).
    """

    name: str
    syntax: str
    audience: str
    matches: Callable[[str], bool]
    load: Callable[[str, ModelOptions], object]
    options: tuple[KindOption, ...] = ()
    threads: Literal["torch", "loader", "none"] = "torch"
    adapters: tuple[str, ...] = ()
    no_gradients: str = ""


_KINDS: dict[str, ModelKind] = {}
_LOADED: list[bool] = [False]


def _load() -> None:
    if _LOADED[0]:
        return
    _LOADED[0] = True
    importlib.import_module(_BUILTIN_KINDS)
    from importlib.metadata import entry_points

    for entry in entry_points(group=KIND_ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a broken plug-in must not break the tool
            import warnings

            warnings.warn(f"model-kind plug-in {entry.name!r} failed to load: {exc}",
                          stacklevel=2)


def register_kind(kind: ModelKind, *, before: str | None = None, replace: bool = False) \
        -> None:
    """Add ``kind`` (last, or just ``before`` the kind of that name); a name already taken
    is refused unless ``replace``. An option name another kind declares differently is
    refused."""
    _load()
    if kind.name in _KINDS and not replace:
        raise InputError(f"model kind {kind.name!r} is already registered (replace=True "
                         "replaces it)")
    declared = {o.name: o for k in _KINDS.values() if k.name != kind.name for o in k.options}
    for option in kind.options:
        other = declared.get(option.name)
        if other is not None and other != option:
            raise InputError(f"model kind {kind.name!r}: option {option.name!r} is declared "
                             "differently by another kind (share the KindOption)")
    entries = [(n, k) for n, k in _KINDS.items() if n != kind.name]
    at = next((i for i, (n, _) in enumerate(entries) if n == before), len(entries))
    entries.insert(at, (kind.name, kind))
    _KINDS.clear()
    _KINDS.update(entries)


def unregister_kind(name: str) -> None:
    """Remove the kind ``name`` (no error when absent)."""
    _load()
    _KINDS.pop(name, None)


def model_kinds() -> tuple[ModelKind, ...]:
    """Every registered kind, in matching order."""
    _load()
    return tuple(_KINDS.values())


def kind_options() -> tuple[KindOption, ...]:
    """Every option some kind declares, once each, in registration order."""
    return tuple({o.name: o for k in model_kinds() for o in k.options}.values())


def kind_of(spec: str) -> ModelKind:
    """The kind of ``spec``; InputError listing the forms a spec can take."""
    for kind in model_kinds():
        if kind.matches(spec.strip()):
            return kind
    forms = ", ".join(k.syntax for k in model_kinds())
    raise InputError(f"model spec {spec!r} is not one of: {forms}")


def spec_kind(spec: str) -> str:
    """The name of ``spec``'s kind (``"easyvqa"``, ``"onnx"``, ``"http"``...)."""
    return kind_of(spec).name


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


def load_model(spec: str, options: ModelOptions | None = None) -> VQAModel:
    """Load the model a spec names and check it has the model protocol."""
    model = kind_of(spec).load(spec, options or ModelOptions())
    return check_model(model, source=f"model spec {spec!r}")
