"""The explanation methods, by name: one :class:`Method` entry each.

An entry says what the method is called on the command line (``name``) and in
``explanation.json`` (``key``), whether its maps are signed or magnitudes, a help text, a
colour-bar label, whether a model can serve it (``available``, returning the reason when
not) and how to bind it to a model (``bind``, returning a :class:`BoundMethod` that
explains inputs one at a time). Every command, the library call
:func:`blackbox_vqa.explain.explain`, the evaluation and the reports take their methods
from here, so a new method is one module plus one :func:`register` call.

The built-in methods are registered by :mod:`blackbox_vqa.explainers.builtin`; packages
can add theirs through the ``blackbox_vqa.methods`` entry-point group (an entry point
names a module, imported when the registry is first used, that calls :func:`register`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_type_hints

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.explainers.cost import CallEstimate, CostQuery
from blackbox_vqa.explanation import Attribution

__all__ = [
    "ENTRY_POINT_GROUP",
    "SCORES",
    "BoundMethod",
    "Method",
    "MethodRequest",
    "MethodSettings",
    "ModelContext",
    "ProgressCallback",
    "SettingSpec",
    "all_setting_specs",
    "bind_methods",
    "default_methods",
    "get_method",
    "method_keys",
    "method_names",
    "parse_methods",
    "positive_int",
    "register",
    "setting",
    "setting_specs",
    "unregister",
]

ENTRY_POINT_GROUP = "blackbox_vqa.methods"
_BUILTIN_MODULE = "blackbox_vqa.explainers.builtin"

ProgressCallback = Callable[[int, int], None]


def setting(default: Any, *, help: str, flag: str | None = None) -> Any:
    """A field of a method's settings dataclass: its ``default``, the ``help`` line of its
    command-line option and the option's name without ``--`` (default: the field's name
    with ``_`` as ``-``). The field's name is its keyword in the library call."""
    return field(default=default, metadata={"help": help, "flag": flag})


def positive_int(name: str, value: object) -> None:
    """Raise :class:`InputError` unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class SettingSpec:
    """One declared setting of a method, as the command line and the library see it.

    Attributes:
        method: the method's name; ``name``: the field (and library keyword);
        flag: the option without ``--``; ``type``: ``int``, ``float``, ``str`` or ``bool``;
        default, help: as declared.
    """

    method: str
    name: str
    flag: str
    type: type
    default: Any
    help: str


def setting_specs(settings: type | None, method: str) -> tuple[SettingSpec, ...]:
    """The settings a method's settings dataclass declares (none for ``None``)."""
    if settings is None:
        return ()
    if not dataclasses.is_dataclass(settings):
        raise InputError(f"method {method!r}: settings must be a dataclass, got {settings!r}")
    hints = get_type_hints(settings)
    specs = []
    for item in dataclasses.fields(settings):
        kind = hints[item.name]
        if kind not in (int, float, str, bool):
            raise InputError(f"method {method!r}: setting {item.name!r} must be an int, float, "
                             f"str or bool, got {kind!r}")
        if "help" not in item.metadata:
            raise InputError(f"method {method!r}: setting {item.name!r} has no help (declare "
                             "it with registry.setting(...))")
        flag = item.metadata.get("flag") or item.name.replace("_", "-")
        specs.append(SettingSpec(method, item.name, flag, kind, item.default,
                                 item.metadata["help"]))
    return tuple(specs)


@dataclass(frozen=True)
class MethodSettings:
    """Settings of the methods: the shared ones, and each method's own.

    Attributes:
        grid: occlusion cells per side (default 16, the paper's).
        window, stride: sliding-window occlusion instead of the grid, ``(h, w)`` pixels.
        baseline: patch fill: ``imagenet-mean``, ``black``, ``blur`` or ``"R,G,B"``.
        batch_size: perturbed inputs per model call, ``"auto"`` or a positive int.
        score: what perturbation methods compare: ``probability`` (the paper's) or
            ``log-probability`` (structure shows where a saturated model's p is ~1).
        methods: method name -> an instance of its settings dataclass (the entry's
            ``settings``); a method left out gets its defaults. Build it from keywords
            with :meth:`create`.
        extra: free-form settings of methods registered from outside, by name.
    """

    grid: int = 16
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    baseline: str = "imagenet-mean"
    batch_size: int | str = "auto"
    score: str = "probability"
    methods: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise InputError(f"grid must be a positive integer, got {self.grid!r}")
        if self.stride is not None and self.window is None:
            raise InputError("stride needs a window")
        if self.score not in SCORES:
            raise InputError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        for name, values in self.methods.items():
            declared = get_method(name).settings
            if declared is None or not isinstance(values, declared):
                raise InputError(f"settings of method {name!r} must be a "
                                 f"{getattr(declared, '__name__', 'None')}, got {values!r}")

    @classmethod
    def create(cls, **keywords: Any) -> MethodSettings:
        """Settings from keywords: the shared fields, and any registered method's setting
        by its name (``rise_masks=500``, ``ig_steps=64``...). An unknown keyword raises
        :class:`InputError` naming the known ones."""
        shared = {f.name for f in dataclasses.fields(cls)} - {"methods"}
        owners = {spec.name: spec.method for spec in all_setting_specs()}
        unknown = sorted(set(keywords) - shared - set(owners))
        if unknown:
            raise InputError(f"unknown setting {unknown[0]!r}; settings are: "
                             f"{', '.join(sorted(shared | set(owners)))}")
        own: dict[str, dict[str, Any]] = {}
        for name, value in keywords.items():
            if name in owners:
                own.setdefault(owners[name], {})[name] = value
        base = {k: v for k, v in keywords.items() if k in shared}
        methods = dict(base.pop("methods", {}) or {})
        for method, values in own.items():
            current = methods.get(method) or cls().of(method)
            methods[method] = dataclasses.replace(current, **values)
        return cls(**base, methods=methods)

    def of(self, method: str) -> Any:
        """The settings of ``method`` (its dataclass; the defaults when not given)."""
        if method in self.methods:
            return self.methods[method]
        declared = get_method(method).settings
        if declared is None:
            raise InputError(f"method {method!r} declares no settings")
        return declared()

    def keywords(self) -> dict[str, Any]:
        """Every method setting in force, by keyword (for records and messages)."""
        return {spec.name: getattr(self.of(spec.method), spec.name)
                for spec in all_setting_specs()}


SCORES = ("probability", "log-probability")
"""What a perturbation method compares (the shared ``score`` setting)."""


@dataclass(frozen=True)
class ModelContext:
    """What a method is bound to: the model, its label (spec or name, for messages) and
    the settings."""

    model: Any
    label: str
    settings: MethodSettings


@dataclass(frozen=True)
class MethodRequest:
    """One input to explain, as a bound method receives it.

    Attributes:
        image: ``float32 H x W x 3`` RGB pixels on the 0-255 scale.
        question: the validated question.
        answer, answer_index: the answer to explain (in the model's vocabulary).
        scores: the model's scores ``[A]`` (``float64``) on the original input.
        progress: ``progress(done, total)`` for long methods, or None.
    """

    image: NDArray[np.float32]
    question: str
    answer: str
    answer_index: int
    scores: NDArray[np.float64]
    progress: ProgressCallback | None = None


class BoundMethod(Protocol):
    """A method ready to explain inputs of one model."""

    def explain(self, request: MethodRequest) -> Attribution:
        """Explain one input; raise :class:`NotSupportedError` when this input cannot be
        explained by the method (it is then recorded as unavailable)."""
        ...


def _always(context: ModelContext) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    """A registry entry.

    Attributes:
        name: the name on the command line (``--method``), e.g. ``"guided-bp"``.
        key: the key of its section in ``explanation.json``, e.g. ``"guided_backprop"``.
        signed: signed maps (a change in score) or magnitudes (>= 0).
        help: one line for ``--help`` and the report.
        bind: ``bind(context) -> BoundMethod``; raises :class:`NotSupportedError` whose
            message is the reason when the model cannot serve the method.
        available: a quick ``available(context) -> reason or None`` check made before
            binding (default: always available).
        image_label: what the image map's colour bar shows.
        kind: ``"black-box"`` (needs only ``answer_probs_batch``) or ``"white-box"``.
        default: run by ``compare`` and ``evaluate`` unless methods are named.
        settings: the method's own settings, a frozen dataclass whose fields are declared
            with :func:`setting` (int, float, str or bool; validated in its
            ``__post_init__``); every command gets an option per field.
        calls: ``calls(CostQuery) -> CallEstimate``: the model inputs it scores for an
            input and the settings, printed before a run (``--dry-run``, HTTP models);
            ``None``: not counted (white-box methods: they make no endpoint calls).
    """

    name: str
    key: str
    signed: bool
    help: str
    bind: Callable[[ModelContext], BoundMethod]
    available: Callable[[ModelContext], str | None] = _always
    image_label: str = ""
    kind: Literal["black-box", "white-box"] = "black-box"
    default: bool = True
    settings: type | None = None
    calls: Callable[[CostQuery], CallEstimate] | None = None

    def __post_init__(self) -> None:
        for label, value in (("name", self.name), ("key", self.key)):
            if not value or value != value.strip() or "," in value or value == "all":
                raise InputError(
                    f"method {label} must be non-empty, without commas or surrounding "
                    f"spaces, and not 'all'; got {value!r}"
                )
        setting_specs(self.settings, self.name)


_REGISTRY: dict[str, Method] = {}
_LOADED: list[bool] = [False]


def _load() -> None:
    if _LOADED[0]:
        return
    _LOADED[0] = True
    importlib.import_module(_BUILTIN_MODULE)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a broken plug-in must not break the tool
            import warnings

            warnings.warn(f"method plug-in {entry.name!r} failed to load: {exc}", stacklevel=2)


def register(method: Method, *, replace: bool = False) -> None:
    """Add ``method``; a name or key already taken is refused unless ``replace``."""
    _load()
    clash = [m for m in _REGISTRY.values()
             if m.name != method.name and m.key == method.key]
    if clash:
        raise InputError(f"method key {method.key!r} is taken by {clash[0].name!r}")
    if method.name in _REGISTRY and not replace:
        raise InputError(f"method {method.name!r} is already registered (replace=True "
                         "replaces it)")
    taken: dict[str, str] = {}
    for other in all_setting_specs():
        if other.method != method.name:
            taken.update(dict.fromkeys((other.name, other.flag.replace("-", "_")), other.method))
    shared = {f.name for f in dataclasses.fields(MethodSettings)} | {"metrics", "sanity"}
    for spec in setting_specs(method.settings, method.name):
        names = {spec.name, spec.flag.replace("-", "_")}
        owner = next((taken[name] for name in sorted(names) if name in taken), None)
        if owner is not None or names & shared:
            raise InputError(f"method {method.name!r}: setting {spec.name!r} (--{spec.flag}) "
                             f"is taken by {owner or 'the shared settings'!r}")
    _REGISTRY[method.name] = method


def unregister(name: str) -> None:
    """Remove the method ``name`` (no error when absent)."""
    _load()
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The entry of ``name``; InputError naming the known methods when there is none."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; known: {', '.join(_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    _load()
    return tuple(_REGISTRY)


def default_methods() -> tuple[str, ...]:
    """The methods run when none are named (``compare``, ``evaluate``)."""
    _load()
    return tuple(name for name, method in _REGISTRY.items() if method.default)


def all_setting_specs() -> tuple[SettingSpec, ...]:
    """The declared settings of every registered method, in registration order."""
    _load()
    return tuple(spec for m in _REGISTRY.values() for spec in setting_specs(m.settings, m.name))


def method_keys() -> dict[str, tuple[str, bool]]:
    """JSON key -> ``(method name, signed)`` of every registered method."""
    _load()
    return {m.key: (m.name, m.signed) for m in _REGISTRY.values()}


def parse_methods(text: str | Sequence[str], *, parameter: str = "methods") -> tuple[str, ...]:
    """``"occlusion,guided-bp"`` (or a list of names) -> the names, deduplicated in order;
    ``"all"`` -> every registered method. Unknown names raise :class:`InputError` naming
    ``parameter`` and the known methods."""
    _load()
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = [str(part).strip().lower() for part in parts if str(part).strip()]
    known = ", ".join(_REGISTRY)
    if not names:
        raise InputError(f"{parameter} must name at least one of {known} (or all)")
    if "all" in names:
        return tuple(_REGISTRY)
    unknown = [name for name in names if name not in _REGISTRY]
    if unknown:
        raise InputError(f"{parameter}: unknown method {unknown[0]!r}; known: {known}, all")
    return tuple(dict.fromkeys(names))


def bind_methods(
    names: Sequence[str], context: ModelContext
) -> tuple[dict[str, BoundMethod], dict[str, str]]:
    """Bind each named method to ``context``: ``(bound methods, {name: why not})``."""
    bound: dict[str, BoundMethod] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        method = get_method(name)
        reason = method.available(context)
        if reason is None:
            try:
                bound[name] = method.bind(context)
                continue
            except NotSupportedError as exc:
                reason = str(exc)
        unavailable[name] = reason
    return bound, unavailable
