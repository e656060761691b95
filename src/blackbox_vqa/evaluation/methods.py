"""The explanation methods an evaluation can run, by name (``occlusion``, ``guided-bp``).

A method is built once per model by its factory and then explains items one at a time:
``explain(image, question, answer)`` returns an image map (2-D, any size), one importance
per question word, and a few numbers (flip counts...). A factory that cannot serve a model
(a method whose module is not installed, a gradient method on a model without gradients)
raises :class:`NotSupportedError` whose message is the reason, and the evaluation goes on
without that method. :func:`register_method` adds a method.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import GradientUnavailableError, InputError, NotSupportedError

__all__ = [
    "METHODS",
    "ItemMethod",
    "MethodOptions",
    "MethodOutput",
    "build_methods",
    "parse_methods",
    "register_method",
]


@dataclass(frozen=True)
class MethodOutput:
    """One item's explanation by one method.

    ``image_map``: ``float64`` 2-D (occlusion: ``grid x grid``; gradients: the model's
    input size). ``word_map``: ``float64 [len(words)]``. ``stats``: numbers such as flips.
    """

    image_map: NDArray[np.float64]
    word_map: NDArray[np.float64]
    words: tuple[str, ...]
    stats: Mapping[str, float] = field(default_factory=dict)


class ItemMethod(Protocol):
    """A method ready to explain items for one model."""

    def explain(self, image: NDArray[Any], question: str, answer: str) -> MethodOutput: ...


@dataclass(frozen=True)
class MethodOptions:
    """Settings shared by the methods: occlusion grid, fill (``baseline``: ``imagenet-mean``,
    ``black``, ``blur`` or ``"R,G,B"``) and batch size."""

    grid: int = 16
    baseline: str = "imagenet-mean"
    batch_size: int | str = "auto"


MethodFactory = Callable[[Any, MethodOptions], ItemMethod]


class _OcclusionMethod:
    def __init__(self, model: Any, options: MethodOptions) -> None:
        from blackbox_vqa.explainers.occlusion import Occlusion

        self._explainer = Occlusion(model, grid=options.grid, baseline=options.baseline,
                                    batch_size=options.batch_size)

    def explain(self, image: NDArray[Any], question: str, answer: str) -> MethodOutput:
        result = self._explainer.explain(image, question, answer=answer)
        return MethodOutput(
            image_map=np.asarray(result.image_map, dtype=np.float64),
            word_map=np.asarray(result.word_map, dtype=np.float64),
            words=tuple(result.words),
            stats={
                "image_flips": float(result.image_flips),
                "word_flips": float(result.word_flips),
                "image_total": float(result.image_perturbations),
                "evaluations": float(result.evaluations),
            },
        )


GUIDED_BACKPROP_MODULE = "blackbox_vqa.explainers.guided_backprop"


class _GuidedBackpropMethod:
    """Guided backpropagation: ``|gradient|`` max over channels at the model's input size;
    word importance = L2 norm of each token's embedding gradient."""

    def __init__(self, model: Any, options: MethodOptions) -> None:
        if importlib.util.find_spec(GUIDED_BACKPROP_MODULE) is None:
            raise NotSupportedError(
                f"guided-bp is not available: {GUIDED_BACKPROP_MODULE} is not part of this "
                "installation"
            )
        from blackbox_vqa.explainers.guided_backprop import GuidedBackprop

        try:
            self._explainer = GuidedBackprop(model, guided=True)
        except GradientUnavailableError as exc:
            raise GradientUnavailableError(f"guided-bp is not available: {exc}") from exc

    def explain(self, image: NDArray[Any], question: str, answer: str) -> MethodOutput:
        result = self._explainer.explain(image, question, answer=answer)
        return MethodOutput(
            image_map=np.asarray(result.image_map, dtype=np.float64),
            word_map=np.asarray(result.word_map, dtype=np.float64),
            words=tuple(result.tokens),
            stats={"probability": float(result.probability)},
        )


METHODS: dict[str, MethodFactory] = {
    "occlusion": _OcclusionMethod,
    "guided-bp": _GuidedBackpropMethod,
}


def register_method(name: str, factory: MethodFactory) -> None:
    """Make ``factory(model, options)`` available under ``name`` (replacing any)."""
    if not name or "," in name or name != name.strip():
        raise InputError(f"method name must be non-empty without commas or spaces, got {name!r}")
    METHODS[name] = factory


def parse_methods(text: str) -> tuple[str, ...]:
    """``"occlusion,guided-bp"`` -> ``("occlusion", "guided-bp")``; unknown names refused."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise InputError(f"--methods must name at least one of {', '.join(METHODS)}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise InputError(
            f"--methods: unknown method {unknown[0]!r}; known: {', '.join(METHODS)}"
        )
    return tuple(dict.fromkeys(names))


def build_methods(
    names: Sequence[str], model: Any, options: MethodOptions
) -> tuple[dict[str, ItemMethod], dict[str, str]]:
    """Build each named method for ``model``: ``(ready methods, {name: why not available})``."""
    ready: dict[str, ItemMethod] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        if name not in METHODS:
            raise InputError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        try:
            ready[name] = METHODS[name](model, options)
        except NotSupportedError as exc:
            unavailable[name] = str(exc)
    return ready, unavailable
