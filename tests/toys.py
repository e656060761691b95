"""Toy models whose answers can be computed by hand, shared by the tests.

Importable as ``toys`` (tests/ is on ``sys.path`` through ``conftest.py``), so factory
specs such as ``toys:brightness_model`` work in CLI tests (pass ``PYTHONPATH=tests`` to a
subprocess).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from blackbox_vqa.adapters.base import BaseAdapter
from blackbox_vqa.text import WordTokenizer, split_words


class BrightnessModel(BaseAdapter):
    """Answers ``bright`` with probability = mean pixel value / 255, else ``dark``.

    The word ``not`` swaps the two scores, so dropping it flips the answer.
    """

    def __init__(self) -> None:
        super().__init__(["dark", "bright"], name="brightness")
        self.calls: list[int] = []

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        self.calls.append(len(images))
        out = []
        for image, question in zip(images, questions, strict=True):
            bright = float(np.asarray(image, dtype=np.float64).mean()) / 255.0
            pair = [1.0 - bright, bright]
            if "not" in split_words(question.lower()):
                pair.reverse()
            out.append(pair)
        return np.asarray(out)


def brightness_model() -> BrightnessModel:
    return BrightnessModel()


class FixedOutputModel:
    """Protocol object returning a preset array, for bad-output tests."""

    name = "fixed"

    def __init__(self, output: Any, answers: Sequence[str] = ("a", "b")) -> None:
        self.answers = list(answers)
        self.output = output

    def answer_probs(self, image: Any, question: str) -> Any:
        return self.answer_probs_batch([image], [question])[0]

    def answer_probs_batch(self, images: Sequence[Any], questions: Sequence[str]) -> Any:
        if callable(self.output):
            return self.output(len(images))
        return self.output


def nan_model() -> FixedOutputModel:
    return FixedOutputModel(lambda b: np.full((b, 2), np.nan))


def negative_model() -> FixedOutputModel:
    return FixedOutputModel(lambda b: np.full((b, 2), -0.5))


def wrong_shape_model() -> FixedOutputModel:
    return FixedOutputModel(lambda b: np.ones((b, 3)))


def not_a_model() -> object:
    return object()


def failing_factory() -> object:
    raise RuntimeError("weights file is corrupt")


class LinearVQANet(nn.Module):
    """``logits = W_img @ mean_rgb(image) + sum of word embeddings``: tiny, exact, ReLU-free.

    Three answers; an ``nn.Embedding`` of width 3 over a 20-word vocabulary.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.image_weight = nn.Parameter(torch.randn(3, 3, generator=gen))
        self.embedding = nn.Embedding(20, 3, padding_idx=0)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(20, 3, generator=gen))
            self.embedding.weight[0].zero_()

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pooled = image.mean(dim=(2, 3))
        return pooled @ self.image_weight.T + self.embedding(tokens).sum(dim=1)


TOY_QUESTIONS = ["what color is the shape", "is there a red circle", "how many shapes"]


def toy_tokenizer() -> WordTokenizer:
    return WordTokenizer.build(TOY_QUESTIONS)


TOY_ANSWERS = ["red", "green", "blue"]


def toy_torch_model() -> Any:
    """TorchAdapter over :class:`LinearVQANet` at 16x16, ImageNet normalisation."""
    from blackbox_vqa.adapters.torch.module import TorchAdapter

    return TorchAdapter(LinearVQANet(), TOY_ANSWERS, toy_tokenizer(), image_size=16,
                        device="cpu", name="toy-linear")


class TwoTokenToy:
    """A hand-computable model whose answer "ab" has two tokens: log p(a) from the image's
    mean brightness, log p(b | a) from the question's length; p("ab") = p(a) p(b | a)."""

    answers = ("ab", "(other)")
    token_answer = "ab"
    answer_token_labels = ("a", "b")
    answer_token_texts = ("a", "b")
    name = "two-token toy"

    @staticmethod
    def logprobs(image: np.ndarray, question: str) -> np.ndarray:
        pixels = np.asarray(image, dtype=np.float64)
        first = -np.log1p(np.exp(-(pixels[:16, :16].mean() / 255 * 4 - 1)))
        second = -np.log1p(np.exp(-(len(question.split()) - 1.5 + pixels[16:].mean() / 255)))
        return np.array([first, second])

    def answer_probs_with_token_logprobs(
        self, images: Any, questions: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.stack([self.logprobs(i, q) for i, q in zip(images, questions, strict=True)])
        prob = np.exp(tokens.sum(axis=1))
        return np.stack([prob, 1 - prob], axis=1), tokens

    def answer_probs_batch(self, images: Any, questions: Any) -> np.ndarray:
        return self.answer_probs_with_token_logprobs(images, questions)[0]

    def answer_probs(self, image: Any, question: str) -> np.ndarray:
        return self.answer_probs_batch([image], [question])[0]


def two_token_model() -> TwoTokenToy:
    """:class:`TwoTokenToy` (for ``--model toys:two_token_model``)."""
    return TwoTokenToy()
