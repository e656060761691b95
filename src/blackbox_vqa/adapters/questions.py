"""Question handling shared by the adapters that tokenize: cached ids and refusals."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.errors import ModelError, QuestionError
from blackbox_vqa.text import PAD_ID, validate_question

__all__ = ["QuestionTokens", "pad_tokens"]

_CACHE_SIZE = 4096


class QuestionTokens:
    """Token ids of questions through ``tokenizer`` (cached), and question validation.

    A question is refused when it is empty, when the tokenizer finds no tokens in it, or,
    for a tokenizer with ``unknown_words``/``words`` methods (e.g. ``WordTokenizer``), when
    all of its words are unknown to the model's vocabulary.
    """

    def __init__(self, tokenizer: Callable[[str], Sequence[int]]) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def tokens(self, question: str) -> list[int]:
        """Token ids of ``question``; raises :class:`ModelError` for negative ids."""
        cached = self._cache.get(question)
        if cached is None:
            cached = [int(t) for t in self.tokenizer(question)]
            if any(t < 0 for t in cached):
                raise ModelError(f"tokenizer returned negative ids for {question!r}")
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[question] = cached
        return cached

    def validate(self, question: str) -> str:
        """Return the stripped question, or raise :class:`QuestionError` naming the problem."""
        stripped = validate_question(question)
        unknown_words = getattr(self.tokenizer, "unknown_words", None)
        if callable(unknown_words):
            unknown = list(unknown_words(stripped))
            words = getattr(self.tokenizer, "words", None)
            n_words = len(words(stripped)) if callable(words) else len(self.tokens(stripped))
            if unknown and len(unknown) >= n_words:
                raise QuestionError(
                    f"none of the words of {stripped!r} are in the model's vocabulary"
                )
        if not self.tokens(stripped):
            raise QuestionError(f"the model's tokenizer found no tokens in {stripped!r}")
        return stripped


def pad_tokens(token_lists: Sequence[Sequence[int]]) -> NDArray[np.int64]:
    """Right-pad token id lists with ``0`` into an ``int64`` array ``[B, max(1, T)]``."""
    length = max([1, *(len(t) for t in token_lists)])
    out = np.full((len(token_lists), length), PAD_ID, dtype=np.int64)
    for row, tokens in enumerate(token_lists):
        out[row, : len(tokens)] = tokens
    return out
