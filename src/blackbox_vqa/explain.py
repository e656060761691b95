"""The one library entry point: explain a model's answer with one or more methods.

>>> from blackbox_vqa.explain import explain
>>> found = explain(model, "photo.png", "what color is the shape?",
...                 methods=("occlusion", "guided-bp"), grid=8)
>>> found.answer, found.attribution("occlusion").image_map

:class:`Explainer` binds the methods to a model once and explains many inputs (the
evaluation uses it per item, ``compare`` per model); :func:`explain` is the one-shot
form. The model's scores on the original input are computed once; every method explains
the same answer (the predicted one unless ``answer`` is given). A method the model cannot
serve is recorded in :attr:`Explanation.unavailable` with the reason; a model failure
(bad scores, a crash inside the model) raises.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import check_model, check_scores, model_name
from blackbox_vqa.adapters.capabilities import (
    check_question,
    choose_answer,
    own_answer,
    prepare_model,
    score_semantics,
)
from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.explainers.registry import (
    BoundMethod,
    MethodRequest,
    MethodSettings,
    ModelContext,
    ProgressCallback,
    bind_methods,
    get_method,
    parse_methods,
)
from blackbox_vqa.explanation import Attribution, Explanation, Unavailable, top_answers
from blackbox_vqa.images import ImageInput, load_image, to_rgb_array
from blackbox_vqa.text import split_words

__all__ = ["Explainer", "ProgressFactory", "explain"]

ProgressFactory = Callable[[str], AbstractContextManager[ProgressCallback | None]]
"""``progress(method) -> context manager yielding progress(done, total) or None``."""


@contextmanager
def _no_progress(method: str) -> Iterator[None]:
    yield None


def _settings(base: MethodSettings | None, overrides: Mapping[str, Any]) -> MethodSettings:
    """``base`` (default: the defaults) with ``overrides``: shared settings and any method's
    own, by keyword (see :meth:`MethodSettings.create`)."""
    if not overrides:
        return base or MethodSettings()
    values = dict(overrides)
    for name in ("window", "stride"):
        if isinstance(values.get(name), int):
            values[name] = (values[name], values[name])
    if base is None:
        return MethodSettings.create(**values)
    shared = {f.name: getattr(base, f.name) for f in dataclasses.fields(MethodSettings)}
    return MethodSettings.create(**{**shared, **values})


def _checked(attribution: Attribution, name: str, seconds: float) -> Attribution:
    """``attribution`` with its wall time, after checking it is the entry's key and sign."""
    entry = get_method(name)
    if not isinstance(attribution, Attribution):
        raise InputError(f"method {name!r} returned {type(attribution).__name__}, not an "
                         "Attribution")
    if (attribution.key, attribution.signed) != (entry.key, entry.signed):
        raise InputError(f"method {name!r} returned key {attribution.key!r} (signed="
                         f"{attribution.signed}); its entry says {entry.key!r} (signed="
                         f"{entry.signed})")
    return dataclasses.replace(attribution, method=name, seconds=seconds)


class Explainer:
    """Methods bound to one model, ready to explain inputs.

    Args:
        model: any object with the model protocol.
        methods: method names (``"occlusion"``, ``"guided-bp"``, ``"gradient"``, any
            registered one, or ``"all"``), a list or a comma-separated string.
        settings: :class:`MethodSettings`; ``**overrides`` replace its shared fields
            (``grid=8``, ``baseline="black"``...) and set any method's own settings by
            keyword (``rise_masks=500``, ``ig_steps=64``...).
        label: the model's label in the document and in messages (default: its name).

    Raises:
        InputError: an unknown method or setting, or an invalid setting value.
    """

    def __init__(
        self,
        model: object,
        *,
        methods: str | Sequence[str] = ("occlusion",),
        settings: MethodSettings | None = None,
        label: str | None = None,
        **overrides: Any,
    ) -> None:
        self.model = check_model(model)
        self.label = label or model_name(model)
        self.settings = _settings(settings, overrides)
        self.methods = parse_methods(methods, parameter="methods")
        context = ModelContext(self.model, self.label, self.settings)
        self._bound: dict[str, BoundMethod]
        self._bound, reasons = bind_methods(self.methods, context)
        self.unavailable: dict[str, Unavailable] = {
            name: Unavailable(name, get_method(name).key, reason)
            for name, reason in reasons.items()
        }

    @property
    def available(self) -> tuple[str, ...]:
        """The methods that can run on this model, in order."""
        return tuple(name for name in self.methods if name in self._bound)

    def explain(
        self,
        image: ImageInput,
        question: str,
        *,
        answer: str | None = None,
        progress: ProgressFactory | None = None,
    ) -> Explanation:
        """Explain the model's answer (or ``answer``) on ``image`` and ``question``.

        ``image``: a path, a PIL image or an ``H x W x 3`` array. ``progress`` is called
        once per method that runs. Raises :class:`InputError` for a bad image, question
        or answer and :class:`ModelError` when the model fails.
        """
        path = str(image) if isinstance(image, (str, Path)) else None
        pixels = load_image(path) if path is not None else to_rgb_array(image)
        pixels = pixels.astype(np.float32, copy=False)
        question = check_question(self.model, question)
        choose_answer(self.model, answer)
        prepare_model(self.model, pixels, question)
        answers = tuple(self.model.answers)
        raw = self.model.answer_probs_batch([pixels], [question])
        scores = check_scores(raw, 1, len(answers), source=model_name(self.model))[0]
        own = own_answer(self.model)
        predicted = int(np.argmax(scores)) if own is None else _answer_index(answers, own)
        index = predicted if answer is None else _answer_index(answers, answer)
        attributions: dict[str, Attribution] = {}
        unavailable = dict(self.unavailable)
        factory = progress or _no_progress
        for name, method in self._bound.items():
            request = MethodRequest(pixels, question, answers[index], index, scores)
            started = time.perf_counter()
            try:
                with factory(name) as update:
                    found = method.explain(dataclasses.replace(request, progress=update))
            except NotSupportedError as exc:
                unavailable[name] = Unavailable(name, get_method(name).key, str(exc))
                continue
            attributions[name] = _checked(found, name, time.perf_counter() - started)
        semantics = score_semantics(self.model)
        return Explanation(
            model=self.label,
            question=question,
            tokens=tuple(split_words(question)),
            image={"path": path, "width": int(pixels.shape[1]), "height": int(pixels.shape[0])},
            answer=answers[index],
            answer_index=index,
            predicted_answer=answers[predicted],
            probability=float(scores[index]),
            top_answers=_top(answers, scores),
            attributions=attributions,
            unavailable={n: unavailable[n] for n in self.methods if n in unavailable},
            sections={"score_semantics": semantics} if semantics else {},
            answers=answers,
            scores=scores,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            pixels=pixels,
        )


_LISTED = 12  # answers listed in the message about an unknown --answer


def _answer_index(answers: Sequence[str], answer: str) -> int:
    if answer not in answers:
        shown = ", ".join(repr(a) for a in answers[:_LISTED])
        more = f" and {len(answers) - _LISTED} more" if len(answers) > _LISTED else ""
        raise InputError(f"answer {answer!r} is not one of the model's answers; it can "
                         f"score {shown}{more}")
    return list(answers).index(answer)


def _top(answers: Sequence[str], scores: NDArray[np.float64]) -> tuple[tuple[str, float], ...]:
    return tuple((entry["answer"], entry["score"]) for entry in top_answers(answers, scores))


def explain(
    model: object,
    image: ImageInput,
    question: str,
    *,
    methods: str | Sequence[str] = ("occlusion",),
    answer: str | None = None,
    settings: MethodSettings | None = None,
    label: str | None = None,
    progress: ProgressFactory | None = None,
    **overrides: Any,
) -> Explanation:
    """Explain ``model``'s answer on one input with ``methods``; see :class:`Explainer`.

    ``**overrides`` are the shared :class:`MethodSettings` fields (``grid``, ``window``,
    ``stride``, ``baseline``, ``batch_size``, ``score``) and any registered method's own
    settings by keyword (``rise_masks``, ``ig_steps``...); an unknown name raises
    :class:`InputError`.
    """
    explainer = Explainer(model, methods=methods, settings=settings, label=label, **overrides)
    return explainer.explain(image, question, answer=answer, progress=progress)
