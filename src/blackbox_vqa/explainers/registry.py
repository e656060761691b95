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

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.explanation import Attribution

__all__ = [
    "ENTRY_POINT_GROUP",
    "BoundMethod",
    "Method",
    "MethodRequest",
    "MethodSettings",
    "ModelContext",
    "ProgressCallback",
    "bind_methods",
    "default_methods",
    "get_method",
    "method_keys",
    "method_names",
    "parse_methods",
    "register",
    "unregister",
]

ENTRY_POINT_GROUP = "blackbox_vqa.methods"
_BUILTIN_MODULE = "blackbox_vqa.explainers.builtin"

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class MethodSettings:
    """Settings of the methods (each method reads the ones it uses).

    Attributes:
        grid: occlusion cells per side (default 16, the paper's).
        window, stride: sliding-window occlusion instead of the grid, ``(h, w)`` pixels.
        baseline: patch fill: ``imagenet-mean``, ``black``, ``blur`` or ``"R,G,B"``.
        batch_size: perturbed inputs per model call, ``"auto"`` or a positive int.
        score: what occlusion and RISE compare: ``probability`` (the paper's) or
            ``log-probability`` (structure shows where a saturated model's p is ~1).
        rise_masks: RISE: random masks (default 2000).
        incremental: occlusion on a model with incremental scoring: ``exact`` (default)
            or ``off``.
        ig_steps: integrated gradients: points of the path integral (default 32).
        ig_baseline: integrated gradients: the image baseline, ``black``, ``blur`` or
            ``imagenet-mean`` (words: the padding token's embedding).
        shap_grid: MM-SHAP: image cells per side (default 4).
        shap_permutations: MM-SHAP: permutations sampled, even (antithetic pairs;
            default 32).
        shap_seed: MM-SHAP: seed of the permutations (default 0).
        extra: settings of methods registered from outside, by name.
    """

    grid: int = 16
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    baseline: str = "imagenet-mean"
    batch_size: int | str = "auto"
    score: str = "probability"
    rise_masks: int = 2000
    incremental: str = "exact"
    ig_steps: int = 32
    ig_baseline: str = "black"
    shap_grid: int = 4
    shap_permutations: int = 32
    shap_seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise InputError(f"grid must be a positive integer, got {self.grid!r}")
        if self.stride is not None and self.window is None:
            raise InputError("stride needs a window")
        if isinstance(self.ig_steps, bool) or not isinstance(self.ig_steps, int) \
                or self.ig_steps < 1:
            raise InputError(f"ig_steps must be a positive integer, got {self.ig_steps!r}")
        if isinstance(self.rise_masks, bool) or not isinstance(self.rise_masks, int) \
                or self.rise_masks < 1:
            raise InputError(f"rise_masks must be a positive integer, got {self.rise_masks!r}")
        for name in ("shap_grid", "shap_permutations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.shap_permutations % 2:
            raise InputError("shap_permutations must be even (antithetic pairs of a "
                             f"permutation and its reverse), got {self.shap_permutations}")
        if isinstance(self.shap_seed, bool) or not isinstance(self.shap_seed, int) \
                or self.shap_seed < 0:
            raise InputError(f"shap_seed must be a non-negative integer, got {self.shap_seed!r}")
        if self.incremental not in ("exact", "off"):
            raise InputError(f"incremental must be exact or off, got {self.incremental!r}")
        if self.score not in ("probability", "log-probability"):
            raise InputError("score must be one of probability, log-probability, got "
                             f"{self.score!r}")


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

    def __post_init__(self) -> None:
        for label, value in (("name", self.name), ("key", self.key)):
            if not value or value != value.strip() or "," in value or value == "all":
                raise InputError(
                    f"method {label} must be non-empty, without commas or surrounding "
                    f"spaces, and not 'all'; got {value!r}"
                )


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
