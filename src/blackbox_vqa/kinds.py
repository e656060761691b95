"""Model kinds as registry entries: a matcher for specs, a loader and declared options.

A kind registered here (by :func:`register_kind`, or by a plug-in's entry point in the
``blackbox_vqa.model_kinds`` group) is tried before the built-in spec syntaxes of
:mod:`blackbox_vqa.specs`; its options become ``--model`` options of every command
(``--NAME-WITH-DASHES``) and keys of model files, and reach its loader by name. An option
given while no model's kind declares it is refused as "only for KIND models". The CLI
reads the registered kinds' options at each run (``refresh_option_groups``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from blackbox_vqa.errors import InputError

__all__ = ["ENTRY_POINT_GROUP", "KindOption", "ModelKind", "kind_of", "register_kind",
           "registered_kinds", "unregister_kind"]

ENTRY_POINT_GROUP = "blackbox_vqa.model_kinds"
OPTION_TYPES = (str, int, float)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class KindOption:
    """One option of a kind: ``name`` (snake_case; the flag is ``--name-with-dashes``),
    ``type`` (str, int or float), ``default`` (passed when not given), ``help``."""

    name: str
    type: type = str
    default: Any = None
    help: str = ""

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"KindOption name must be snake_case, got {self.name!r}")
        if self.type not in OPTION_TYPES:
            raise ValueError(f"KindOption {self.name!r}: type must be str, int or float, "
                             f"got {self.type!r}")

    @property
    def flag(self) -> str:
        """The CLI flag, ``--name-with-dashes``."""
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any, *, where: str) -> Any:
        """``value`` as ``type`` (a model file's value); InputError naming the option."""
        if isinstance(value, bool) or (self.type is not str and isinstance(value, str)
                                       and not value.strip()):
            raise InputError(f"{where}: {self.name} must be {self.type.__name__}, "
                             f"got {value!r}")
        try:
            return self.type(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: {self.name} must be {self.type.__name__}, "
                             f"got {value!r}") from None


@dataclass(frozen=True)
class ModelKind:
    """A model kind: ``matches(spec)`` says whether a spec is of this kind;
    ``load(spec, options)`` builds the model from the spec and ``{option name: value}``
    (every declared option, its default when not given); ``runs_here``: the model computes
    in this process (``--threads`` applies)."""

    name: str
    matches: Callable[[str], bool]
    load: Callable[[str, Mapping[str, Any]], object]
    options: tuple[KindOption, ...] = ()
    runs_here: bool = True
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"ModelKind name must be snake_case, got {self.name!r}")


_KINDS: dict[str, ModelKind] = {}
_LOADED = [False]


def _load_plugins() -> None:
    if _LOADED[0]:
        return
    _LOADED[0] = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            if isinstance(loaded, ModelKind) and loaded.name not in _KINDS:
                register_kind(loaded)
        except Exception as exc:  # a broken plug-in must not break the tool
            import warnings

            warnings.warn(f"model kind plug-in {entry.name!r} failed to load: {exc}",
                          stacklevel=2)


def register_kind(kind: ModelKind, *, replace: bool = False) -> None:
    """Add ``kind``; a name already taken, or an option declared with another type by an
    other kind, is refused (ValueError) unless ``replace``."""
    _load_plugins()
    if kind.name in _KINDS and not replace:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    for option in kind.options:
        for other in _KINDS.values():
            same = [o for o in other.options if o.name == option.name]
            if other.name != kind.name and same and same[0].type is not option.type:
                raise ValueError(f"model kind {kind.name!r}: option {option.name!r} is "
                                 f"declared as {same[0].type.__name__} by {other.name!r}")
    _KINDS[kind.name] = kind


def unregister_kind(name: str) -> None:
    """Remove a registered kind (tests)."""
    _KINDS.pop(name, None)


def registered_kinds() -> tuple[ModelKind, ...]:
    """Registered kinds, the latest first (the order specs are matched in)."""
    _load_plugins()
    return tuple(reversed(_KINDS.values()))


def kind_of(spec: str) -> ModelKind | None:
    """The registered kind whose matcher takes ``spec``, or None (a built-in syntax)."""
    for kind in registered_kinds():
        if kind.matches(spec.strip()):
            return kind
    return None

