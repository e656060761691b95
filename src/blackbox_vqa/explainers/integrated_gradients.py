"""Integrated gradients (Sundararajan, Taly & Yan 2017) through the path-gradient protocol.

For an input ``x`` (the preprocessed image tensor and the question's word embeddings), a
baseline ``x'`` and the score ``F`` of one answer, the attribution of input coordinate
``i`` is ``(x_i - x'_i) * integral_0^1 dF/dx_i (x' + a (x - x')) da``; the integral is
computed with a quadrature rule of ``steps`` points (Gauss-Legendre by default, as
Captum's ``IntegratedGradients``; Riemann rules on request). Completeness says the
attributions sum to ``F(x) - F(x')``; the result reports both sides.

Baselines: the image is replaced by a black, blurred or ImageNet-mean image (built on the
image as given, then preprocessed by the model), and every token of a question word by
the padding token's embedding; tokens in no word (``[CLS]``, ``?``...) stay as they are.
Image attributions are at the model's input resolution; the image map sums the three
channels (signed), the word map sums each word's tokens and embedding dimensions (signed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import model_name
from blackbox_vqa.adapters.gradients import answer_index as resolve_answer
from blackbox_vqa.adapters.torch.path_gradients import (
    GradientInputs,
    PathGradientModel,
    has_path_gradients,
)
from blackbox_vqa.errors import GradientUnavailableError, InputError, ModelError
from blackbox_vqa.explainers.masks import baseline_image, parse_baseline
from blackbox_vqa.explanation import Attribution
from blackbox_vqa.images import ImageInput, to_rgb_array
from blackbox_vqa.text import split_words, validate_question

__all__ = [
    "RULES",
    "IntegratedGradients",
    "IntegratedGradientsResult",
    "baseline_embeddings",
    "ig_attribution",
    "integrated_gradients_dict",
    "path_points",
]

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
         "riemann_trapezoid")


def path_points(steps: int, rule: str = "gausslegendre") -> tuple[
    NDArray[np.float64], NDArray[np.float64]
]:
    """Quadrature on ``[0, 1]``: points ``alphas [steps]`` and weights ``[steps]`` (sum 1).

    ``gausslegendre`` and the ``riemann_left/right/middle`` rules place the points as
    Captum does. ``riemann_trapezoid`` is the trapezoid rule (half weight at both ends);
    Captum's method of that name weighs its ``steps`` points ``1/steps`` each.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    n = int(steps)
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (nodes + 1.0) / 2.0, weights / 2.0
    if rule == "riemann_trapezoid":
        if n < 2:
            raise InputError(f"riemann_trapezoid needs steps >= 2, got {steps}")
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2.0
        return np.linspace(0.0, 1.0, n), weights
    offsets = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}
    if rule not in offsets:
        raise InputError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    return (np.arange(n) + offsets[rule]) / n, np.full(n, 1.0 / n)


@dataclass(frozen=True)
class IntegratedGradientsResult:
    """What one integrated-gradients explanation found.

    Attributes:
        answer, answer_index: the answer explained (predicted unless one was asked for).
        predicted_index: the answer the model predicts on the input.
        scores: ``float64 [A]`` the model's scores on the input.
        baseline: the image baseline (``"black"``, ``"blur"``, ``"imagenet-mean"`` or
            ``"R,G,B"``); words always start from the padding token's embedding.
        steps, rule: the quadrature (number of points, rule name).
        attributions: ``float32 [3, H, W]`` image attributions (preprocessed tensor).
        image_map: ``float64 [H, W]`` attributions summed over channels (signed).
        tokens: one label per word (the question's words; ``"#id"`` labels when the
            model's tokens do not line up with them).
        word_map: ``float64 [W]`` attributions of each word (signed); empty when the
            model has no word embedding (``words_note`` says why).
        score_input, score_baseline: ``F(x)`` and ``F(x')`` for the answer.
        attribution_sum: sum of every attribution (image and words).
        words_note: why there are no word attributions (empty otherwise).
    """

    answer: str
    answer_index: int
    predicted_index: int
    scores: NDArray[np.float64]
    baseline: str
    steps: int
    rule: str
    attributions: NDArray[np.float32]
    image_map: NDArray[np.float64]
    tokens: tuple[str, ...]
    word_map: NDArray[np.float64]
    score_input: float
    score_baseline: float
    attribution_sum: float
    words_note: str = ""

    @property
    def probability(self) -> float:
        """Score of the explained answer on the input."""
        return float(self.scores[self.answer_index])

    @property
    def completeness_gap(self) -> float:
        """``attribution_sum - (score_input - score_baseline)``: 0 for an exact integral."""
        return self.attribution_sum - (self.score_input - self.score_baseline)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the model's input."""
        return int(self.attributions.shape[1]), int(self.attributions.shape[2])

    def completeness(self) -> dict[str, float]:
        """JSON-ready completeness check."""
        return {
            "attribution_sum": self.attribution_sum,
            "score_difference": self.score_input - self.score_baseline,
            "score_input": self.score_input,
            "score_baseline": self.score_baseline,
            "gap": self.completeness_gap,
        }


class IntegratedGradients:
    """Integrated gradients for models with the path-gradient protocol.

    Args:
        model: a :class:`~blackbox_vqa.adapters.torch.module.TorchAdapter`,
            :class:`~blackbox_vqa.adapters.hf.vqa.HfAdapter` or any object with
            ``gradient_inputs`` and ``path_gradients``.
        steps: quadrature points (default 32).
        baseline: image baseline: ``"black"`` (default), ``"blur"``, ``"imagenet-mean"``
            or ``"R,G,B"`` on the 0-255 scale.
        batch_size: points per model call (default 16).
        rule: quadrature rule, one of :data:`RULES` (default Gauss-Legendre).
        blur_sigma: Gaussian sigma in pixels for ``"blur"`` (default: 1/16 of the
            image's shorter side).
    """

    def __init__(
        self,
        model: object,
        *,
        steps: int = 32,
        baseline: str = "black",
        batch_size: int = 16,
        rule: str = "gausslegendre",
        blur_sigma: float | None = None,
    ) -> None:
        if not has_path_gradients(model):
            raise GradientUnavailableError(
                f"{model_name(model)} offers no path gradients; integrated gradients needs a "
                "PyTorch model (TorchAdapter) or a Hugging Face model (hf:PATH)"
            )
        self.model: PathGradientModel = model  # type: ignore[assignment]
        self.alphas, self.weights = path_points(steps, rule)
        self.steps = int(steps)
        self.rule = rule
        if not isinstance(baseline, str):
            raise InputError(f"baseline must be a string, got {baseline!r}")
        self.baseline = parse_baseline(baseline)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        if blur_sigma is not None and not blur_sigma > 0:
            raise InputError(f"blur_sigma must be > 0, got {blur_sigma!r}")
        self.blur_sigma = blur_sigma

    def explain(
        self, image: ImageInput, question: str, answer: str | int | None = None
    ) -> IntegratedGradientsResult:
        """Attributions of the score of ``answer`` (default: predicted); see the result."""
        question = validate_question(question)
        pixels = to_rgb_array(image).astype(np.float32)
        inputs = self.model.gradient_inputs(pixels, question)
        start = self.model.gradient_inputs(self._baseline_image(pixels), question)
        if start.image.shape != inputs.image.shape:
            raise ModelError(
                f"the baseline image became {start.image.shape} in the model, the input "
                f"{inputs.image.shape}"
            )
        index = resolve_answer(self.model.answers, answer, inputs.predicted_index)
        word_start = baseline_embeddings(inputs)
        image_grad, word_grad, ends = self._integrate(inputs, start.image, word_start, index)
        image_attr = (inputs.image - start.image) * image_grad
        word_attr = (inputs.embeddings - word_start) * word_grad
        return self._result(inputs, question, index, image_attr, word_attr, ends)

    def _baseline_image(self, pixels: NDArray[np.float32]) -> NDArray[np.float32]:
        sigma = self.blur_sigma or max(1.0, min(pixels.shape[:2]) / 16.0)
        return np.ascontiguousarray(baseline_image(pixels, self.baseline, blur_sigma=sigma))

    def _integrate(
        self,
        inputs: GradientInputs,
        image_start: NDArray[np.float32],
        word_start: NDArray[np.float32],
        index: int,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], tuple[float, float]]:
        """Weighted sums of the gradients along the path; ``(F(x'), F(x))`` from the ends."""
        alphas = np.concatenate([[0.0, 1.0], self.alphas])
        weights = np.concatenate([[0.0, 0.0], self.weights])
        image_delta = inputs.image - image_start
        word_delta = inputs.embeddings - word_start
        image_sum = np.zeros(inputs.image.shape, dtype=np.float64)
        word_sum = np.zeros(inputs.embeddings.shape, dtype=np.float64)
        scores: list[float] = []
        for first in range(0, len(alphas), self.batch_size):
            a = alphas[first : first + self.batch_size]
            w = weights[first : first + self.batch_size]
            images = _points(image_start, image_delta, a)
            words = _points(word_start, word_delta, a)
            grads = self.model.path_gradients(inputs, images, words, index)
            image_sum += np.tensordot(w, grads.image.astype(np.float64), axes=1)
            word_sum += np.tensordot(w, grads.embeddings.astype(np.float64), axes=1)
            scores.extend(float(v) for v in grads.scores)
        return image_sum, word_sum, (scores[0], scores[1])

    def _result(
        self,
        inputs: GradientInputs,
        question: str,
        index: int,
        image_attr: NDArray[np.float64],
        word_attr: NDArray[np.float64],
        ends: tuple[float, float],
    ) -> IntegratedGradientsResult:
        per_token = word_attr.sum(axis=1) if word_attr.size else np.zeros(word_attr.shape[0])
        tokens: tuple[str, ...] = ()
        if inputs.embeddings.shape[-1] == 0:
            word_map = np.zeros(0)
        else:
            word_map = np.array([per_token[list(p)].sum() for p in inputs.word_positions])
            tokens = _labels(inputs, split_words(question))
        baseline = self.baseline if isinstance(self.baseline, str) else ",".join(
            f"{v:g}" for v in self.baseline
        )
        return IntegratedGradientsResult(
            answer=self.model.answers[index],
            answer_index=index,
            predicted_index=inputs.predicted_index,
            scores=np.asarray(inputs.scores, dtype=np.float64),
            baseline=baseline,
            steps=self.steps,
            rule=self.rule,
            attributions=image_attr.astype(np.float32),
            image_map=image_attr.sum(axis=0),
            tokens=tokens,
            word_map=word_map.astype(np.float64),
            score_input=ends[1],
            score_baseline=ends[0],
            attribution_sum=float(image_attr.sum() + word_attr.sum()),
            words_note=inputs.words_note,
        )


def baseline_embeddings(inputs: GradientInputs) -> NDArray[np.float32]:
    """``[T, D]``: the padding embedding at every token of a question word, else unchanged."""
    start = inputs.embeddings.copy()
    for positions in inputs.word_positions:
        start[list(positions)] = inputs.pad_embedding
    return start


def _points(
    start: NDArray[Any], delta: NDArray[Any], alphas: NDArray[np.float64]
) -> NDArray[np.float32]:
    """``start + a * delta`` for each ``a``: ``float32 [len(alphas), *start.shape]``."""
    shape = (-1,) + (1,) * start.ndim
    out = start[None].astype(np.float64) + alphas.reshape(shape) * delta[None]
    return out.astype(np.float32)


def _labels(inputs: GradientInputs, words: list[str]) -> tuple[str, ...]:
    if len(words) == len(inputs.word_positions):
        return tuple(words)
    return tuple(f"#{inputs.token_ids[p[0]]}" if p else "#" for p in inputs.word_positions)


def integrated_gradients_dict(
    result: IntegratedGradientsResult, *, attribution_file: str
) -> dict[str, Any]:
    """A JSON-ready section for ``explanation.json`` (the integrator may rename keys).

    ``image`` is the signed ``H x W`` map (channels summed) at the model's resolution;
    the raw ``[3, H, W]`` attributions are meant to be saved beside the JSON as
    ``attribution_file``; ``words`` one signed value per word; ``completeness`` the check.
    """
    height, width = result.image_size
    return {
        "available": True,
        "answer": result.answer,
        "answer_index": result.answer_index,
        "probability": result.probability,
        "baseline": result.baseline,
        "word_baseline": "padding-token embedding",
        "steps": result.steps,
        "rule": result.rule,
        "image_size": [height, width],
        "image": result.image_map.tolist(),
        "attribution_file": attribution_file,
        "attribution_shape": [3, height, width],
        "tokens": list(result.tokens),
        "words": result.word_map.tolist(),
        "words_note": result.words_note or None,
        "completeness": result.completeness(),
    }


def ig_attribution(
    result: IntegratedGradientsResult, *, source: str = "model"
) -> Attribution:
    """``result`` as the ``integrated_gradients`` attribution: its section of
    ``explanation.json``, the raw attributions as ``integrated_gradients.npy`` beside it."""
    file_name = "integrated_gradients.npy"
    section = integrated_gradients_dict(result, attribution_file=file_name)
    extras = {k: v for k, v in section.items() if k not in ("image", "words")}
    extras["source"] = source
    return Attribution(
        method="integrated-gradients",
        key="integrated_gradients",
        signed=True,
        answer=result.answer,
        answer_index=result.answer_index,
        probability=result.probability,
        image_map=np.asarray(result.image_map, dtype=np.float64),
        word_map=np.asarray(result.word_map, dtype=np.float64),
        tokens=tuple(result.tokens),
        extras=extras,
        stats={"completeness_gap": float(result.completeness_gap)},
        arrays={file_name: np.asarray(result.attributions, dtype=np.float32)},
    )
