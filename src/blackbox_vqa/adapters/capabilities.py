"""Optional capabilities a model may declare on top of the model protocol.

Each capability is a :func:`typing.runtime_checkable` protocol; explainers test for it with
``isinstance`` through the helpers below, in one place, instead of probing attributes.
A model that lacks a capability gets the default behaviour.

- :class:`SupportsQuestionValidation`: the model checks (and normalises) a question itself,
  e.g. refuses one with no word it knows.
- :class:`SupportsPreferredBatchSize`: the model states how many inputs an explainer should
  hand over per call (HTTP endpoints: enough to keep every connection busy).
- :class:`SupportsPreparation`: the model must see the input to be explained before its
  answer list is complete (HTTP endpoints that return top-k lists or only an answer learn
  their vocabulary from it). Explainers call :func:`prepare_model` before reading
  ``answers``, so the answer list is fixed once an explanation starts.
- :class:`SupportsInputAnswers`: whether preparing the model for an input changes its
  answer list (a generative model's own answer joins it), so that no fixed list, such as
  the one ``bbvqa serve`` publishes, can stand for it.
- :class:`SupportsAnswerChoice`: the model explains any answer text it is given
  (generative models); the answer list then holds it.
- :class:`SupportsOwnAnswer`: the answer to explain by default is the model's own (its
  greedy answer), not the arg-max of its scores.
- :class:`SupportsScoreSemantics`: the model's scores are not its own probabilities (lower
  bounds, flips...); the explanation records what they mean.
- :class:`SupportsTokenAblation`: the model's image path is a lattice of patch tokens; it
  scores the input with chosen image tokens ablated after the vision embedding (the
  image is embedded once), for token occlusion.
- :class:`SupportsTokenAblationCheck`: the model can tell before seeing an image why it
  has no image-token lattice (a model family or processor setting it cannot map).
- :class:`SupportsAnswerTokenScores`: the explained answer's score is a product over its
  tokens (a generative model's sequence probability); the model returns each token's
  log-probability given its prefix from the same forward pass as the scores, so
  black-box methods give one map per answer token at no extra cost.

The gradient protocol lives in :mod:`blackbox_vqa.adapters.gradients` (it needs torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from blackbox_vqa.images import ImageInput
from blackbox_vqa.text import validate_question

__all__ = [
    "AnswerTokens",
    "SupportsAnswerChoice",
    "SupportsAnswerTokenScores",
    "SupportsInputAnswers",
    "SupportsOwnAnswer",
    "SupportsPreferredBatchSize",
    "SupportsPreparation",
    "SupportsQuestionValidation",
    "SupportsScoreSemantics",
    "SupportsTokenAblation",
    "SupportsTokenAblationCheck",
    "answer_tokens",
    "answers_follow_input",
    "check_question",
    "choose_answer",
    "own_answer",
    "preferred_batch_size",
    "prepare_model",
    "score_semantics",
    "token_ablation_refusal",
]


@runtime_checkable
class SupportsQuestionValidation(Protocol):
    """The model validates questions: returns the stripped question or raises
    :class:`~blackbox_vqa.errors.QuestionError`."""

    def validate_question(self, question: str) -> str: ...


@runtime_checkable
class SupportsPreferredBatchSize(Protocol):
    """The model's preferred number of inputs per ``answer_probs_batch`` call (None: no
    preference yet)."""

    @property
    def preferred_batch_size(self) -> int | None: ...


@runtime_checkable
class SupportsPreparation(Protocol):
    """The model gets ready for an input before it is explained (idempotent)."""

    def prepare(self, image: ImageInput, question: str) -> None: ...


@runtime_checkable
class SupportsScoreSemantics(Protocol):
    """What the model's scores mean, when they are not its own probabilities."""

    @property
    def score_semantics(self) -> Mapping[str, Any] | None: ...


@runtime_checkable
class SupportsAnswerChoice(Protocol):
    """The model can be told which answer text to explain (generative models: any text,
    not only one from a fixed list)."""

    def choose_answer(self, answer: str) -> None: ...


@runtime_checkable
class SupportsInputAnswers(Protocol):
    """Whether the model's answer list follows the input it is prepared for (its own
    generated answer joins the list), rather than staying the same for every input."""

    @property
    def answers_follow_input(self) -> bool: ...


def answers_follow_input(model: object) -> bool:
    """Whether ``model``'s answer list changes with the input it is prepared for (False
    for a model that does not say)."""
    return isinstance(model, SupportsInputAnswers) and bool(model.answers_follow_input)


@runtime_checkable
class SupportsOwnAnswer(Protocol):
    """The model's own answer is not the arg-max of its scores (a generative model's greedy
    answer, scored by its sequence probability beside "(other)"): explainers explain it."""

    @property
    def own_answer(self) -> str | None: ...


def own_answer(model: object) -> str | None:
    """The model's own answer when it declares one (after :func:`prepare_model`), else None."""
    if isinstance(model, SupportsOwnAnswer):
        found = model.own_answer
        return found if isinstance(found, str) else None
    return None


def choose_answer(model: object, answer: str | None) -> None:
    """Tell a model that supports it which answer to explain (no-op otherwise)."""
    if answer is not None and isinstance(model, SupportsAnswerChoice):
        model.choose_answer(answer)


def check_question(model: object, question: object) -> str:
    """The stripped question, validated by the model when it can, else by the default
    rules (a non-empty string with at least one word)."""
    if isinstance(model, SupportsQuestionValidation):
        return str(model.validate_question(validate_question(question)))
    return validate_question(question)


def prepare_model(model: object, image: ImageInput, question: str) -> None:
    """Let a model that needs it see the input to be explained (no-op for others)."""
    if isinstance(model, SupportsPreparation):
        model.prepare(image, question)


def preferred_batch_size(model: object) -> int | None:
    """The model's preferred batch size, or None when it has none."""
    if isinstance(model, SupportsPreferredBatchSize):
        value = model.preferred_batch_size
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def score_semantics(model: object) -> dict[str, Any] | None:
    """A copy of what the model's scores mean, or None when they are its own."""
    if isinstance(model, SupportsScoreSemantics):
        found = model.score_semantics
        return dict(found) if found else None
    return None


@runtime_checkable
class SupportsTokenAblation(Protocol):
    """The model's image path is a ``rows x cols`` lattice of patch tokens covering the
    whole image (row-major, top row first).

    ``token_baseline`` names what replaces an ablated token. ``image_token_grid(image)``
    returns ``(rows, cols)`` for ``image``. ``token_ablation_scores(image, question,
    cells)`` embeds the image once and returns the scores ``[1 + len(cells), A]``
    (``float64``) of the original input (row 0) and of the input with each cell's tokens
    (a list of ``(row, col)`` lattice positions) ablated.
    """

    token_baseline: str

    def image_token_grid(self, image: ImageInput) -> tuple[int, int]: ...

    def token_ablation_scores(
        self, image: ImageInput, question: str, cells: Any
    ) -> Any: ...


@runtime_checkable
class SupportsTokenAblationCheck(Protocol):
    """``token_ablation_unavailable()``: why the model has no image-token lattice, or None
    when it has one (an image may still be refused when its tokens are counted)."""

    def token_ablation_unavailable(self) -> str | None: ...


def token_ablation_refusal(model: object) -> str | None:
    """Why ``model`` cannot serve token ablation, when it says so before any image."""
    if isinstance(model, SupportsTokenAblationCheck):
        found = model.token_ablation_unavailable()
        return str(found) if found else None
    return None


@runtime_checkable
class SupportsAnswerTokenScores(Protocol):
    """The score of one answer is the product of its tokens' probabilities, each given its
    prefix (a generative model's teacher-forced sequence probability).

    ``token_answer`` is that answer (one of ``answers``), or None when no answer has
    token scores now (candidate mode, no answer chosen yet); ``answer_token_labels`` its
    tokens as the tokenizer names them and ``answer_token_texts`` each decoded alone
    (end-of-sequence included when it is scored). ``answer_probs_with_token_logprobs(
    images, questions)`` returns the scores ``[B, A]`` (exactly ``answer_probs_batch``'s)
    and ``log p(token_i | input, tokens_<i)`` ``[B, L]`` (``float64``), both from the same
    forward passes.
    """

    @property
    def token_answer(self) -> str | None: ...

    @property
    def answer_token_labels(self) -> Sequence[str]: ...

    @property
    def answer_token_texts(self) -> Sequence[str]: ...

    def answer_probs_with_token_logprobs(
        self, images: Sequence[ImageInput], questions: Sequence[str]
    ) -> tuple[Any, Any]: ...


@dataclass(frozen=True)
class AnswerTokens:
    """The tokens of the answer being explained, when the model scores them one by one:
    ``labels`` as the tokenizer names them, ``texts`` each decoded alone."""

    labels: tuple[str, ...]
    texts: tuple[str, ...]


def answer_tokens(model: object, answer: str) -> AnswerTokens | None:
    """The tokens of ``answer`` when the model scores them one by one (after
    :func:`prepare_model`) and there are two or more of them, else None: a one-token
    answer's map is the log-probability map itself."""
    if not isinstance(model, SupportsAnswerTokenScores) or model.token_answer != answer:
        return None
    labels = tuple(str(t) for t in model.answer_token_labels)
    texts = tuple(str(t) for t in model.answer_token_texts)
    if len(labels) < 2 or len(texts) != len(labels):
        return None
    return AnswerTokens(labels, texts)
