"""The model options every command that takes ``--model`` shares, defined once.

:func:`with_model_options` adds one option per option that a registered model kind
declares (:class:`blackbox_vqa.specs.KindOption`: the HTTP format, headers and timeouts;
the ONNX file's answers, vocabulary, size...; threads), built from the kind registry
whenever the command runs, and hands the command one :class:`ModelSettings` instead.
:func:`load` turns a ``--model`` value and those settings into a loaded model.

A ``--model`` value of the form ``@FILE:NAME`` takes the spec and its options from table
``NAME`` of a TOML (or JSON) model file, so that models that need different options can
be used side by side (``bbvqa compare``)::

    [remote]
    spec = "http://127.0.0.1:8000"
    headers = ["Authorization: Bearer ${BBVQA_TOKEN}"]   # ${VAR}: from the environment
    http_timeout = 30

    [vendor]
    spec = "https://api.example.com/vqa"
    http_format = "hf"

Keys are the option names or flags without ``--`` (``http-format`` or ``http_format``;
``answers`` or ``answers_file``); ``header`` and ``headers`` are both accepted; values are
type-checked. Options given in the file win over the
command line's for that model; a model's label is ``NAME``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from blackbox_vqa.cli.option_groups import Parameter, option_group
from blackbox_vqa.errors import InputError

__all__ = [
    "LoadedModel",
    "ModelSettings",
    "load",
    "resolve",
    "with_model_options",
    "with_model_options_except",
]

_PANEL = "Model options"


@dataclass(frozen=True)
class ModelSettings:
    """The model options given, by option name (``http_timeout``, ``vocab``...; see
    :func:`blackbox_vqa.specs.kind_options`); an option not given is absent."""

    values: Mapping[str, Any] = field(default_factory=dict)

    @property
    def given(self) -> frozenset[str]:
        """The names of the options given."""
        return frozenset(self.values)

    @property
    def threads(self) -> int | None:
        """``--threads``, or None."""
        value = self.values.get("threads")
        return None if value is None else int(value)

    def with_values(self, **values: Any) -> ModelSettings:
        """These settings with ``values`` given too (checked)."""
        return _check(ModelSettings({**self.values, **values}))

    def extra(self, spec: str, *, strict: bool = True) -> dict[str, Any]:
        """The ``ModelOptions.extra`` a spec's loader reads: the given options its kind
        declares. With ``strict``, options the spec's kind cannot use are refused, naming
        the flags; otherwise they are left out (``compare``: options meant for another of
        its models)."""
        from blackbox_vqa.specs import kind_of

        if strict:
            self.refuse_unusable([spec])
        names = {option.name for option in kind_of(spec).options}
        return {name: value for name, value in self.values.items() if name in names}

    def refuse_unusable(self, specs: list[str]) -> None:
        """Raise :class:`InputError` for a given option that none of ``specs`` can use,
        naming the models that can (from the kinds that declare it)."""
        from blackbox_vqa.specs import kind_of, kind_options, model_kinds

        usable = {option.name for spec in specs for option in kind_of(spec).options}
        what = specs[0] if len(specs) == 1 else "any of the models"
        refused: dict[str, list[str]] = {}
        for option in kind_options():
            if option.name in self.values and option.name not in usable:
                audience = option.audience or " or ".join(
                    k.audience for k in model_kinds() if option in k.options)
                refused.setdefault(audience, []).append(option.option)
        for audience, flags in refused.items():
            who = audience if audience.startswith("models") else f"{audience} models"
            raise InputError(f"{', '.join(flags)}: only for {who}, not for {what!r}")


def _check(settings: ModelSettings) -> ModelSettings:
    from blackbox_vqa.specs import kind_options

    for option in kind_options():
        value = settings.values.get(option.name)
        if value is not None and option.check is not None:
            option.check(value)
    return settings


def _annotation(option: Any) -> Any:
    """``Annotated[type | None, typer.Option(...)]`` of a kind option."""
    kind = list[str] if option.type in (list[str], tuple[str, ...]) else option.type
    return Annotated[kind | None, typer.Option(option.option, help=option.help,
                                                rich_help_panel=_PANEL)]


def _parameters() -> list[Parameter]:
    """One option per option some registered kind declares."""
    from blackbox_vqa.specs import kind_options

    return [(option.name, _annotation(option), None) for option in kind_options()]


def with_model_options(command: Callable[..., None]) -> Callable[..., None]:
    """Decorate a Typer command that has a ``model_settings: ModelSettings`` parameter: the
    command gets every model option and receives their values as one
    :class:`ModelSettings`."""
    return with_model_options_except()(command)


def with_model_options_except(
    *exclude: str,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """:func:`with_model_options` without the options named in ``exclude`` (a command
    that defines one of them itself)."""
    return option_group(_parameters, "model_settings", _settings, exclude=exclude)


def _settings(values: dict[str, Any]) -> ModelSettings:
    given = {name: (tuple(value) if isinstance(value, list) else value)
             for name, value in values.items() if value not in (None, [], ())}
    return _check(ModelSettings(given))


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model: ``spec`` as resolved, ``label`` to show (no credentials)."""

    spec: str
    label: str
    model: Any
    settings: ModelSettings


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(text: str, where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise InputError(f"{where}: environment variable {name} is not set")
        return os.environ[name]

    return _ENV_RE.sub(replace, text)


def _read_model_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--model @{path}: model file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--model @{path}: cannot read the model file: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except ValueError as exc:
        raise InputError(f"--model @{path}: not valid {path.suffix[1:].upper() or 'TOML'}: "
                         f"{exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"--model @{path}: expected tables of models")
    return data


def _from_file(text: str, settings: ModelSettings) -> tuple[str, str, ModelSettings]:
    path_text, sep, name = text[1:].rpartition(":")
    if not sep or not path_text or not name:
        raise InputError(f"--model {text!r}: a model file is given as @FILE:NAME")
    path = Path(path_text)
    table = _read_model_file(path).get(name)
    where = f"--model @{path}:{name}"
    if not isinstance(table, dict):
        raise InputError(f"{where}: the model file has no table [{name}]")
    spec = table.get("spec")
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"{where}: 'spec' (the model spec) is missing")
    entry = _file_options(table, where)
    for key in ("answers_file", "vocab"):
        if entry.get(key) is not None:
            entry[key] = (path.parent / str(entry[key])).resolve()
    merged = _check(ModelSettings({**settings.values, **entry}))
    return _expand(spec.strip(), where), name, merged


def _file_options(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A model file's table as option values: keys are option names or flags (``-`` or
    ``_``; ``headers`` for ``header``), values type-checked; ``${VAR}`` in headers is
    taken from the environment."""
    from blackbox_vqa.specs import kind_options

    options = kind_options()
    names = {o.name: o for o in options}
    names.update({(o.flag or o.name).replace("-", "_"): o for o in options})
    names["headers"] = names["header"]
    entry: dict[str, Any] = {}
    for key, value in table.items():
        if key == "spec":
            continue
        option = names.get(str(key).replace("-", "_"))
        if option is None:
            raise InputError(f"{where}: unknown key {str(key)!r}; known: spec, "
                             f"{', '.join(sorted(o.name for o in options))}")
        entry[option.name] = option.coerce(value, where)
    if "header" in entry:
        entry["header"] = tuple(_expand(h, where) for h in entry["header"])
    return entry


def resolve(text: str, settings: ModelSettings) -> tuple[str, str, ModelSettings]:
    """``(spec, label, settings)`` of ``--model TEXT`` (a spec, or ``@FILE:NAME``); the
    label never holds credentials."""
    from blackbox_vqa.specs import kind_of, public_spec

    if text.strip().startswith("@"):
        spec, label, settings = _from_file(text.strip(), settings)
    else:
        spec, label = text.strip(), public_spec(text.strip())
    kind_of(spec)
    return spec, label, settings


def load(text: str, settings: ModelSettings, *, strict: bool = True) -> LoadedModel:
    """Load ``--model TEXT`` (a spec, or ``@FILE:NAME``) with the model options; see
    :meth:`ModelSettings.extra` for ``strict``."""
    from blackbox_vqa.specs import ModelOptions, kind_of, load_model

    spec, label, settings = resolve(text, settings)
    model = load_model(spec, ModelOptions(extra=settings.extra(spec, strict=strict)))
    if settings.threads is not None and kind_of(spec).threads == "torch":
        import torch

        torch.set_num_threads(settings.threads)
    return LoadedModel(spec, label, model, settings)
