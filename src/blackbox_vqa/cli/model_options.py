"""The model options every command that takes ``--model`` shares, defined once.

:func:`with_model_options` adds the options (HTTP format, headers, concurrency, timeout;
the ONNX file's answers, vocabulary, size, mean, std, output kind and tensor names;
threads) to a Typer command and hands the command one :class:`ModelSettings` instead.
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

Keys are the option names without ``--`` (``http-format`` or ``http_format``);
``header`` and ``headers`` are both accepted. Options given in the file win over the
command line's for that model; a model's label is ``NAME``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from blackbox_vqa.adapters.base import OUTPUT_KINDS
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



_ONNX_FLAGS = {
    "answers_file": "answers", "vocab": "vocab", "image_size": "image-size", "mean": "mean",
    "std": "std", "output_kind": "output-kind", "image_input": "image-input",
    "tokens_input": "tokens-input", "output_name": "output-name",
}
_HTTP_FLAGS = {
    "http_format": "http-format", "header": "header", "http_concurrency": "http-concurrency",
    "http_timeout": "http-timeout", "remote_model": "remote-model", "prompt": "prompt",
    "max_tokens": "max-tokens", "http_total_timeout": "http-total-timeout",
    "http_max_response_mb": "http-max-response-mb",
}


@dataclass(frozen=True)
class ModelSettings:
    """The shared model options' values (None: not given)."""

    http_format: str | None = None
    header: tuple[str, ...] = ()
    http_concurrency: int | None = None
    http_timeout: float | None = None
    http_total_timeout: float | None = None
    http_max_response_mb: float | None = None
    remote_model: str | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    answers_file: Path | None = None
    vocab: Path | None = None
    image_size: str | None = None
    mean: str | None = None
    std: str | None = None
    output_kind: str | None = None
    image_input: str | None = None
    tokens_input: str | None = None
    output_name: str | None = None
    threads: int | None = None
    trust_remote_code: bool | None = None
    given: frozenset[str] = field(default=frozenset(), compare=False)

    def extra(self, spec: str, *, strict: bool = True) -> dict[str, Any]:
        """The ``ModelOptions.extra`` a spec's loader reads. With ``strict``, options the
        spec's kind cannot use are refused, naming the flags; otherwise they are left out
        (``compare``: options meant for another of its models)."""
        from blackbox_vqa.specs import spec_kind

        kind = spec_kind(spec)
        onnx = {k: getattr(self, k) for k in _ONNX_FLAGS if getattr(self, k) is not None}
        if strict:
            self.refuse_unusable([spec])
        found: dict[str, Any] = {}
        if kind == "http":
            found.update({
                "http_format": self.http_format or "ours", "http_headers": list(self.header),
                "http_concurrency": self.http_concurrency,
                "http_timeout": 60.0 if self.http_timeout is None else self.http_timeout,
                "http_total_timeout": self.http_total_timeout,
                "http_max_response_bytes": None if self.http_max_response_mb is None
                else int(self.http_max_response_mb * 2**20),
                "remote_model": self.remote_model, "prompt": self.prompt,
                "max_tokens": self.max_tokens,
            })
        if kind == "hf" and self.answers_file is not None:
            found["answers_file"] = self.answers_file
        if kind == "hf":
            found.update({"prompt": self.prompt, "max_tokens": self.max_tokens,
                          "trust_remote_code": bool(self.trust_remote_code),
                          "strict": strict})
        if kind == "onnx":
            names = {"answers_file": "answers_file", "vocab": "vocab_file",
                     "output_kind": "output"}
            found.update({names.get(k, k): v for k, v in onnx.items()})
            if self.threads is not None:
                found["threads"] = self.threads
        return found


    def refuse_unusable(self, specs: list[str]) -> None:
        """Raise :class:`InputError` for a given option that none of ``specs`` can use."""
        from blackbox_vqa.specs import spec_kind

        kinds = {spec_kind(spec) for spec in specs}
        what = specs[0] if len(specs) == 1 else "any of the models"
        onnx = [k for k in _ONNX_FLAGS if getattr(self, k) is not None
                and not (k == "answers_file" and "hf" in kinds)]
        http = [k for k in _HTTP_FLAGS if k in self.given and getattr(self, k) not in (None, ())
                and not (k in ("prompt", "max_tokens") and "hf" in kinds)]
        if onnx and "onnx" not in kinds:
            flags = ", ".join("--" + _ONNX_FLAGS[k] for k in onnx)
            raise InputError(f"{flags}: only for .onnx models, not for {what!r}")
        if http and "http" not in kinds:
            flags = ", ".join("--" + _HTTP_FLAGS[k] for k in http)
            raise InputError(f"{flags}: only for http:// models, not for {what!r}")
        if self.trust_remote_code and "hf" not in kinds:
            raise InputError(f"--trust-remote-code: only for hf: models, not for {what!r}")
        if self.threads is not None and kinds == {"http"}:
            raise InputError(f"--threads: only for models that run here, not for {what!r}")


def _check(settings: ModelSettings) -> ModelSettings:
    if settings.threads is not None and (isinstance(settings.threads, bool)
                                         or settings.threads < 1):
        raise InputError(f"--threads must be >= 1, got {settings.threads}")
    if settings.output_kind is not None and settings.output_kind not in OUTPUT_KINDS:
        raise InputError(f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}, "
                         f"got {settings.output_kind!r}")
    return settings


_PARAMETERS: list[Parameter] = [
    ("http_format", Annotated[str | None, typer.Option(
        help="Wire format of an http:// model: ours, hf (top-k lists), answer-only or openai "
        "(chat completions; default ours).", rich_help_panel="Model options")], None),
    ("header", Annotated[list[str] | None, typer.Option(
        help="Extra HTTP header 'Name: value' (repeatable; never printed).",
        rich_help_panel="Model options")], None),
    ("http_concurrency", Annotated[int | None, typer.Option(
        help="Most HTTP requests in flight (default 4).", rich_help_panel="Model options")],
     None),
    ("http_timeout", Annotated[float | None, typer.Option(
        help="HTTP read timeout, seconds (default 60).", rich_help_panel="Model options")],
     None),
    ("http_total_timeout", Annotated[float | None, typer.Option(
        help="Most seconds one HTTP request may take in all (default 300).",
        rich_help_panel="Model options")], None),
    ("http_max_response_mb", Annotated[float | None, typer.Option(
        help="Largest HTTP answer in MiB, after decompression (default 64).",
        rich_help_panel="Model options")], None),
    ("remote_model", Annotated[str | None, typer.Option(
        help="--http-format openai: the endpoint's model name (default: the only one it "
        "lists).", rich_help_panel="Model options")], None),
    ("prompt", Annotated[str | None, typer.Option(
        help="--http-format openai and generative hf: models: prompt template with "
        "{question} (openai default: the question and 'Answer the question with a single "
        "word or number.'; hf: the question).", rich_help_panel="Model options")], None),
    ("max_tokens", Annotated[int | None, typer.Option(
        help="--http-format openai and generative hf: models: most tokens generated "
        "(default 8).", rich_help_panel="Model options")], None),
    ("answers_file", Annotated[Path | None, typer.Option(
        "--answers", help="ONNX file without metadata: its answers; hf: BLIP's candidate "
        "answers (one per line, or a JSON list).", rich_help_panel="Model options")], None),
    ("vocab", Annotated[Path | None, typer.Option(
        help="ONNX file without metadata: its vocabulary (JSON word->id, or one word per "
        "line, ids from 2).", rich_help_panel="Model options")], None),
    ("image_size", Annotated[str | None, typer.Option(
        help="ONNX file: model input size N or HxW.", rich_help_panel="Model options")], None),
    ("mean", Annotated[str | None, typer.Option(
        help="ONNX file: normalisation mean 'r,g,b' (0-1 scale; default ImageNet's).",
        rich_help_panel="Model options")], None),
    ("std", Annotated[str | None, typer.Option(
        help="ONNX file: normalisation std 'r,g,b' (0-1 scale; default ImageNet's).",
        rich_help_panel="Model options")], None),
    ("output_kind", Annotated[str | None, typer.Option(
        help="ONNX file: its output is softmax (logits), sigmoid (logits) or probs.",
        rich_help_panel="Model options")], None),
    ("image_input", Annotated[str | None, typer.Option(
        help="ONNX file: name of the image input (default: found by type).",
        rich_help_panel="Model options")], None),
    ("tokens_input", Annotated[str | None, typer.Option(
        help="ONNX file: name of the token input (default: found by type).",
        rich_help_panel="Model options")], None),
    ("output_name", Annotated[str | None, typer.Option(
        help="ONNX file: name of the score output (default: the only one).",
        rich_help_panel="Model options")], None),
    ("trust_remote_code", Annotated[bool | None, typer.Option(
        "--trust-remote-code", help="hf: load a model whose code lives in its folder "
        "(runs that code; refused without this flag).", rich_help_panel="Model options")],
     None),
    ("threads", Annotated[int | None, typer.Option(
        help="CPU threads of a model that runs here (torch threads; ONNX Runtime intra-op "
        "threads; default: the library's own).", rich_help_panel="Model options")], None),
]


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
    return option_group(_PARAMETERS, "model_settings", _settings, exclude=exclude)


def _settings(values: dict[str, Any]) -> ModelSettings:
    given = frozenset(k for k, v in values.items() if v is not None)
    values["header"] = tuple(values.get("header") or ())
    return _check(ModelSettings(**values, given=given))


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
    entry = {str(k).replace("-", "_"): v for k, v in table.items()}
    if "headers" in entry:
        entry["header"] = entry.pop("headers")
    spec = entry.pop("spec", None)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"{where}: 'spec' (the model spec) is missing")
    known = {f.name for f in dataclasses.fields(ModelSettings)} - {"given"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; known: spec, "
                         f"{', '.join(sorted(known))}")
    if isinstance(entry.get("header"), str):
        entry["header"] = [entry["header"]]
    if "header" in entry:
        entry["header"] = tuple(_expand(str(h), where) for h in entry["header"])
    for key in ("answers_file", "vocab"):
        if entry.get(key) is not None:
            entry[key] = (path.parent / str(entry[key])).resolve()
    merged = dataclasses.replace(settings, **entry, given=settings.given | set(entry))
    return _expand(spec.strip(), where), name, _check(merged)


def resolve(text: str, settings: ModelSettings) -> tuple[str, str, ModelSettings]:
    """``(spec, label, settings)`` of ``--model TEXT`` (a spec, or ``@FILE:NAME``); the
    label never holds credentials."""
    from blackbox_vqa.specs import public_spec, spec_kind

    if text.strip().startswith("@"):
        spec, label, settings = _from_file(text.strip(), settings)
    else:
        spec, label = text.strip(), public_spec(text.strip())
    spec_kind(spec)
    return spec, label, settings


def load(text: str, settings: ModelSettings, *, strict: bool = True) -> LoadedModel:
    """Load ``--model TEXT`` (a spec, or ``@FILE:NAME``) with the model options; see
    :meth:`ModelSettings.extra` for ``strict``."""
    from blackbox_vqa.specs import ModelOptions, load_model, spec_kind

    spec, label, settings = resolve(text, settings)
    model = load_model(spec, ModelOptions(extra=settings.extra(spec, strict=strict)))
    if settings.threads is not None and spec_kind(spec) not in ("onnx", "http"):
        import torch

        torch.set_num_threads(settings.threads)
    return LoadedModel(spec, label, model, settings)
