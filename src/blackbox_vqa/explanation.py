"""Typed explanation results and the ``explanation.json`` document they are written as.

An :class:`Attribution` is what one method found (an image map, a word map, and the
method's own JSON keys); an :class:`Explanation` holds the model's answer on one input and
one attribution per method that ran, plus the methods that could not run and why. This
module is the only place that turns them into the document (schema
``blackbox_vqa.explanation/1``, see docs/concepts/explanation-json.md) and reads them back.

Each method's section of the document is ``{**attribution.extras, "image": image_map,
"words": word_map}`` under the method's JSON key (``occlusion``, ``guided_backprop``...),
plus ``"answer_tokens"`` (:class:`TokenMaps`, format ``blackbox_vqa.answer_tokens/1``) when
the method gave one map per answer token; a method that could not run has
``{"available": false, "reason": ...}`` there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError
from blackbox_vqa.version import __version__

__all__ = [
    "SCHEMA",
    "TOKEN_MAPS_FORMAT",
    "Attribution",
    "Explanation",
    "TokenMaps",
    "Unavailable",
    "probability_text",
    "set_html_renderer",
    "top_answers",
]

SCHEMA = "blackbox_vqa.explanation/1"
TOKEN_MAPS_FORMAT = "blackbox_vqa.answer_tokens/1"
"""Format of a method section's ``answer_tokens`` block (an addition to schema /1: present
only for per-token maps, so documents of other models are unchanged)."""

ALWAYS_PRESENT = ("occlusion", "guided_backprop")
"""Method keys the document always has (null when the method did not run)."""

_IMAGE_KEYS = ("path", "width", "height")


def top_answers(
    answers: Sequence[str], scores: NDArray[np.floating[Any]], k: int = 5
) -> list[dict[str, Any]]:
    """The ``k`` highest-scoring answers as ``{"answer", "score"}``, best first."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return [{"answer": answers[i], "score": float(scores[i])} for i in order]


def probability_text(value: float) -> str:
    """A probability as shown to people: 4 decimals, or 3 significant digits below 0.001
    (an answer sequence's probability is often near 1e-9, which 4 decimals show as 0)."""
    return f"{value:.4f}" if value == 0 or value >= 1e-3 else f"{value:.3g}"


@dataclass(frozen=True)
class TokenMaps:
    """One map per token of the explained answer, for a model whose score is a product
    over the answer's tokens (generative models).

    The map of token ``i`` is computed exactly like the method's main map with the score
    ``log p(token_i | input, tokens_<i)`` in place of the answer's score (always a
    log-probability, whatever the main map's score); for occlusion the maps sum over the
    tokens to the main map with ``--score log-probability``.

    Attributes:
        tokens: the answer's tokens as the tokenizer names them (end-of-sequence
            included when it is scored); ``texts`` each decoded alone.
        logprobs: ``float64 [L]``, each token's log-probability on the original input.
        image_maps: ``L`` maps shaped like the main image map (empty ``0 x 0`` when the
            method has none).
        word_maps: ``L`` maps shaped like the main word map (empty when it has none).
    """

    tokens: tuple[str, ...]
    texts: tuple[str, ...]
    logprobs: NDArray[np.float64]
    image_maps: tuple[NDArray[np.float64], ...]
    word_maps: tuple[NDArray[np.float64], ...]

    def __post_init__(self) -> None:
        sizes = {len(self.tokens), len(self.texts), len(self.logprobs),
                 len(self.image_maps), len(self.word_maps)}
        if len(sizes) != 1:
            raise InputError(f"token maps: tokens, texts, logprobs and maps must have one "
                             f"entry per token, got lengths {sorted(sizes)}")

    def to_json(self) -> dict[str, Any]:
        """The ``answer_tokens`` block of a method's section."""
        return {
            "format": TOKEN_MAPS_FORMAT,
            "score": "log-probability of the token given its prefix",
            "tokens": list(self.tokens),
            "texts": list(self.texts),
            "logprobs": [float(v) for v in self.logprobs],
            "maps": [{"image": image.tolist(), "words": words.tolist()}
                     for image, words in zip(self.image_maps, self.word_maps, strict=True)],
        }

    @classmethod
    def from_json(cls, block: Mapping[str, Any]) -> TokenMaps:
        """Read an ``answer_tokens`` block back."""
        maps = list(block["maps"])
        images = []
        for entry in maps:
            image = np.asarray(entry.get("image") or np.zeros((0, 0)), dtype=np.float64)
            images.append(image.reshape(0, 0) if image.size == 0 else image)
        return cls(
            tokens=tuple(str(t) for t in block["tokens"]),
            texts=tuple(str(t) for t in block.get("texts", block["tokens"])),
            logprobs=np.asarray(block["logprobs"], dtype=np.float64),
            image_maps=tuple(images),
            word_maps=tuple(np.asarray(e.get("words") or [], dtype=np.float64) for e in maps),
        )


@dataclass(frozen=True)
class Attribution:
    """What one explanation method found for one input.

    Attributes:
        method: the method's registry name (``"occlusion"``, ``"guided-bp"``...).
        key: its key in ``explanation.json`` (``"occlusion"``, ``"guided_backprop"``...).
        signed: whether the maps are signed (a change in score, possibly negative) or
            magnitudes (>= 0); reports choose their colour scale from it.
        answer, answer_index: the answer explained; ``probability`` its score on the
            original input as the method's model saw it.
        image_map: ``float64``, 2-D: a ``grid x grid`` lattice, a per-pixel map at the
            image's size, or at the model's input size (gradients).
        word_map: ``float64 [len(tokens)]``, one importance per token.
        tokens: the tokens ``word_map`` belongs to (the question's words unless the method
            saw other tokens).
        extras: the method's own JSON-ready keys of its section (flips, mode...).
        stats: numbers an evaluation stores per item (flip counts, evaluations...).
        arrays: large arrays written beside the document, file name -> array (e.g. the
            raw gradient ``guided_backprop.npy``); not part of the JSON.
        seconds: wall time of the method.
        answer_tokens: one map per answer token (:class:`TokenMaps`) when the method
            gives them (black-box methods on a generative model), else None.
    """

    method: str
    key: str
    signed: bool
    answer: str
    answer_index: int
    probability: float
    image_map: NDArray[np.float64]
    word_map: NDArray[np.float64]
    tokens: tuple[str, ...]
    extras: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, float] = field(default_factory=dict)
    arrays: Mapping[str, NDArray[Any]] = field(default_factory=dict)
    seconds: float = 0.0
    answer_tokens: TokenMaps | None = None

    def section(self, *, with_files: bool = True) -> dict[str, Any]:
        """The method's section of ``explanation.json``; without files (the ``arrays`` are
        not written), keys naming one of them are null."""
        extras = dict(self.extras)
        if not with_files:
            extras = {k: None if isinstance(v, str) and v in self.arrays else v
                      for k, v in extras.items()}
        found = {**extras, "image": self.image_map.tolist(), "words": self.word_map.tolist()}
        if self.answer_tokens is not None:
            found["answer_tokens"] = self.answer_tokens.to_json()
        return found


@dataclass(frozen=True)
class Unavailable:
    """A method that could not run on a model, and why."""

    method: str
    key: str
    reason: str


@dataclass(frozen=True)
class Explanation:
    """A model's answer on one image and question, explained by one or more methods.

    Attributes:
        model: the model's label (its spec or name).
        question: the question (stripped); ``tokens`` its words.
        image: ``path`` (or None), ``width`` and ``height`` of the image as given.
        answer, answer_index: the answer explained; ``probability`` its score.
        predicted_answer: the answer the model predicts on the original input.
        top_answers: up to five ``(answer, score)``, best first.
        attributions: method name -> :class:`Attribution`, in the order they ran.
        unavailable: method name -> :class:`Unavailable`.
        sections: further top-level keys of the document (``score_semantics``...).
        answers, scores: the model's whole vocabulary and scores ``[A]`` (empty when
            read back from a document, which keeps only the top answers).
        created, version: when and by which version it was made.
        pixels: the image as explained, ``H x W x 3`` (0-255), for display only: never
            written to the document (None when read back from one).
    """

    model: str
    question: str
    tokens: tuple[str, ...]
    image: Mapping[str, Any]
    answer: str
    answer_index: int
    predicted_answer: str
    probability: float
    top_answers: tuple[tuple[str, float], ...]
    attributions: Mapping[str, Attribution] = field(default_factory=dict)
    unavailable: Mapping[str, Unavailable] = field(default_factory=dict)
    sections: Mapping[str, Any] = field(default_factory=dict)
    answers: tuple[str, ...] = ()
    scores: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    created: str = ""
    version: str = __version__
    pixels: NDArray[Any] | None = field(default=None, compare=False, repr=False)

    def _repr_html_(self) -> str | None:
        """Jupyter's rich display: the report's model card (see :func:`set_html_renderer`)."""
        return None if _html_renderer is None else _html_renderer(self)

    def attribution(self, method: str) -> Attribution | None:
        """The attribution of ``method`` (registry name), or None when it did not run."""
        return self.attributions.get(method)

    @property
    def timing(self) -> dict[str, float]:
        """Seconds per method, keyed ``"<json key>_s"``."""
        return {f"{a.key}_s": round(a.seconds, 4) for a in self.attributions.values()}

    def to_dict(self, *, with_files: bool = True) -> dict[str, Any]:
        """The ``explanation.json`` document (``with_files``: see
        :meth:`Attribution.section`)."""
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "model": self.model,
            "question": self.question,
            "tokens": list(self.tokens),
            "image": {key: self.image.get(key) for key in _IMAGE_KEYS},
            "answer": self.answer,
            "answer_index": self.answer_index,
            "predicted_answer": self.predicted_answer,
            "probability": self.probability,
            "top_answers": [{"answer": a, "score": s} for a, s in self.top_answers],
        }
        for key in ALWAYS_PRESENT:
            doc[key] = None
        for gone in self.unavailable.values():
            doc[gone.key] = {"available": False, "reason": gone.reason}
        for found in self.attributions.values():
            doc[found.key] = found.section(with_files=with_files)
        doc["timing"] = self.timing
        doc["created"] = self.created or _now()
        doc["version"] = self.version
        doc.update(self.sections)
        return doc

    @classmethod
    def from_dict(
        cls, doc: Mapping[str, Any], methods: Mapping[str, tuple[str, bool]]
    ) -> Explanation:
        """Read a document back; ``methods`` maps each JSON key to ``(method name, signed)``
        (the registry's :func:`~blackbox_vqa.explainers.registry.method_keys`). Sections of
        keys not in ``methods`` stay in ``sections``."""
        try:
            return _from_dict(cls, doc, methods)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not an explanation document: {type(exc).__name__}: {exc}") \
                from exc


_TOP_LEVEL = frozenset({
    "schema", "model", "question", "tokens", "image", "answer", "answer_index",
    "predicted_answer", "probability", "top_answers", "timing", "created", "version",
})


def _from_dict(
    cls: type[Explanation], doc: Mapping[str, Any], methods: Mapping[str, tuple[str, bool]]
) -> Explanation:
    tokens = tuple(str(t) for t in doc.get("tokens", []))
    timing = doc.get("timing") or {}
    attributions: dict[str, Attribution] = {}
    unavailable: dict[str, Unavailable] = {}
    sections: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _TOP_LEVEL:
            continue
        if key not in methods:
            sections[key] = value
            continue
        name, signed = methods[key]
        if not isinstance(value, Mapping):
            continue
        if value.get("available") is False:
            unavailable[name] = Unavailable(name, key, str(value.get("reason") or ""))
            continue
        attributions[name] = _attribution(name, key, signed, value, doc, tokens, timing)
    return cls(
        model=str(doc["model"]),
        question=str(doc["question"]),
        tokens=tokens,
        image=dict(doc.get("image") or {}),
        answer=str(doc["answer"]),
        answer_index=int(doc["answer_index"]),
        predicted_answer=str(doc.get("predicted_answer", doc["answer"])),
        probability=float(doc["probability"]),
        top_answers=tuple((str(e["answer"]), float(e["score"]))
                          for e in doc.get("top_answers", [])),
        attributions=attributions,
        unavailable=unavailable,
        sections=sections,
        created=str(doc.get("created", "")),
        version=str(doc.get("version", "")),
    )


def _attribution(
    name: str, key: str, signed: bool, section: Mapping[str, Any], doc: Mapping[str, Any],
    tokens: tuple[str, ...], timing: Mapping[str, Any],
) -> Attribution:
    extras = {k: v for k, v in section.items()
              if k not in ("image", "words", "answer_tokens")}
    block = section.get("answer_tokens")
    image = np.asarray(section.get("image") or np.zeros((0, 0)), dtype=np.float64)
    words = np.asarray(section.get("words") or [], dtype=np.float64)
    own = section.get("tokens")
    return Attribution(
        method=name,
        key=key,
        signed=signed,
        answer=str(section.get("answer", doc["answer"])),
        answer_index=int(section.get("answer_index", doc["answer_index"])),
        probability=float(section.get("probability", doc["probability"])),
        image_map=image.reshape(0, 0) if image.size == 0 else image,
        word_map=words,
        tokens=tuple(str(t) for t in own) if isinstance(own, list) and own else tokens,
        extras=extras,
        seconds=float(timing.get(f"{key}_s", 0.0)),
        answer_tokens=TokenMaps.from_json(block) if isinstance(block, Mapping) else None,
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_html_renderer: Callable[[Explanation], str] | None = None


def set_html_renderer(renderer: Callable[[Explanation], str] | None) -> None:
    """Make ``renderer(explanation) -> HTML`` what :meth:`Explanation._repr_html_` shows.

    The report layer renders explanations, and sits above this module; the package root
    installs :func:`blackbox_vqa.report.notebook.explanation_html` here, so that every
    explanation displays as its report card in Jupyter without this module importing it.
    """
    global _html_renderer
    _html_renderer = renderer
