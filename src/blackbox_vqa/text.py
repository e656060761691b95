"""Question text: splitting into words, dropping one word, and a vocabulary tokenizer;
and :func:`terminal_safe` for text from outside that is shown on a terminal.

A *word* is a run of letters or digits, with inner apostrophes or hyphens kept
(``what's``, ``t-shirt``); punctuation and white space are not words. The occlusion
explainer and :class:`WordTokenizer` use the same rule, so the i-th word occluded is
the i-th token the reference model sees.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blackbox_vqa.errors import InputError, QuestionError

__all__ = [
    "OTHER_ANSWER",
    "PAD_ID",
    "UNK_ID",
    "WordTokenizer",
    "drop_word",
    "keep_words",
    "normalise_answer",
    "split_words",
    "terminal_safe",
    "validate_question",
    "word_spans",
]

WORD_PATTERN = r"\w+(?:['\u2019-]\w+)*"
_WORD_RE = re.compile(WORD_PATTERN)
_SPACE = " \t\r\n\f\v"

PAD_ID = 0
UNK_ID = 1

# C0 controls (ESC starts ANSI CSI/OSC sequences), DEL and C1 controls (0x9b is a one-byte
# CSI); then Unicode's line/paragraph separators and bidirectional overrides/isolates, which
# reorder what the terminal shows.
_UNSAFE = [*range(0x20), 0x7F, *range(0x80, 0xA0)]
_UNSAFE_WIDE = [0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_TERMINAL_TABLE = {cp: f"\\x{cp:02x}" for cp in _UNSAFE} | \
    {cp: f"\\u{cp:04x}" for cp in _UNSAFE_WIDE}
_TERMINAL_TABLE_LINES = {cp: v for cp, v in _TERMINAL_TABLE.items() if cp != 0x0A}


def terminal_safe(text: str, *, newlines: bool = False) -> str:
    """``text`` with every control character escaped visibly, safe to print on a terminal.

    Text from outside (a model's answer, an endpoint's error message, a file name) may
    hold ANSI/OSC escape sequences that retitle or clear the terminal or fake output.
    Each C0 control (tab and newline included), DEL and each C1 control becomes ``\\xNN``;
    Unicode line separators and bidirectional overrides become ``\\uNNNN``. Escaped, not
    stripped: the reader sees that something was there. Backslashes are kept as they are.
    With ``newlines=True``, ``"\\n"`` is kept (for multi-line text).
    """
    return text.translate(_TERMINAL_TABLE_LINES if newlines else _TERMINAL_TABLE)


OTHER_ANSWER = "(other)"
"""The placeholder answer beside the answers a model lists: everything else (an endpoint's
unlisted answers, a generative model's answers other than the one explained). Never a
real answer, so never one that two models share."""


def normalise_answer(answer: str) -> str:
    """Lower-case, trimmed, inner white space collapsed, a final period dropped.

    How answers are compared: the evaluation's accuracy, and the answers read from a
    chat model's generated text.
    """
    text = " ".join(str(answer).lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def word_spans(question: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the words of ``question``, in order."""
    return [m.span() for m in _WORD_RE.finditer(question)]


def split_words(question: str) -> list[str]:
    """The words of ``question`` as written (case kept), in order."""
    return _WORD_RE.findall(question)


def validate_question(question: object) -> str:
    """Return ``question`` stripped, or raise :class:`QuestionError` naming the problem."""
    if not isinstance(question, str):
        raise QuestionError(f"question must be a string, got {type(question).__name__}")
    stripped = question.strip()
    if not stripped:
        raise QuestionError("question is empty (or only white space)")
    if not split_words(stripped):
        raise QuestionError(f"question {question!r} contains no words")
    return stripped


def drop_word(question: str, index: int) -> str:
    """Rebuild ``question`` without its ``index``-th word.

    The word and the white space that separated it from its left neighbour are removed
    (the space to its right when it is the first word); punctuation stays, so
    ``drop_word("what color is the shape?", 4) == "what color is the?"``. Only that
    occurrence is removed when a word repeats.
    """
    spans = word_spans(question)
    if not 0 <= index < len(spans):
        raise InputError(f"word index must be in [0, {len(spans)}), got {index}")
    start, end = spans[index]
    left = start
    while left > 0 and question[left - 1] in _SPACE:
        left -= 1
    if left > 0:
        return (question[:left] + question[end:]).strip()
    right = end
    while right < len(question) and question[right] in _SPACE:
        right += 1
    return (question[:start] + question[right:]).strip()


def keep_words(question: str, keep: Sequence[bool]) -> str:
    """Rebuild ``question`` with only the words whose flag in ``keep`` is true.

    ``keep`` has one flag per word of :func:`split_words`. The absent words are dropped as
    :func:`drop_word` drops one, last first, so one absent word gives exactly
    ``drop_word(question, i)``; punctuation stays (``"what color?"`` with no word kept is
    ``"?"``).
    """
    spans = word_spans(question)
    if len(keep) != len(spans):
        raise InputError(f"keep must have one flag per word ({len(spans)}), got {len(keep)}")
    text = question
    for index in range(len(spans) - 1, -1, -1):
        if not keep[index]:
            text = drop_word(text, index)
    return text


@dataclass(frozen=True)
class WordTokenizer:
    """Maps a question to token ids with a fixed vocabulary.

    Words are found with :func:`split_words` and lower-cased. Id ``0`` is padding and
    id ``1`` stands for any word not in the vocabulary. Calling the tokenizer returns
    the list of ids (possibly empty for a question with no words).
    """

    vocab: Mapping[str, int]
    lowercase: bool = True

    def __post_init__(self) -> None:
        ids = set(self.vocab.values())
        if PAD_ID in ids or UNK_ID in ids:
            raise InputError("vocab ids 0 (padding) and 1 (unknown) are reserved")

    @classmethod
    def build(cls, questions: Iterable[str], *, min_count: int = 1) -> WordTokenizer:
        """Build a vocabulary from ``questions``: ids from 2 in order of first appearance."""
        counts: Counter[str] = Counter()
        order: dict[str, None] = {}
        for question in questions:
            for word in split_words(question.lower()):
                counts[word] += 1
                order.setdefault(word, None)
        words = [w for w in order if counts[w] >= min_count]
        return cls({w: i + 2 for i, w in enumerate(words)})

    def words(self, question: str) -> list[str]:
        """The normalised words of ``question`` (lower-cased when ``lowercase``)."""
        text = question.lower() if self.lowercase else question
        return split_words(text)

    def __call__(self, question: str) -> list[int]:
        return [self.vocab.get(w, UNK_ID) for w in self.words(question)]

    def unknown_words(self, question: str) -> list[str]:
        """Words of ``question`` that are not in the vocabulary."""
        return [w for w in self.words(question) if w not in self.vocab]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (vocabulary and rules) that :meth:`from_dict` reads."""
        return {
            "kind": "word",
            "pattern": WORD_PATTERN,
            "lowercase": self.lowercase,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "vocab": dict(self.vocab),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WordTokenizer:
        """Rebuild a tokenizer written by :meth:`to_dict`."""
        if data.get("kind") != "word" or not isinstance(data.get("vocab"), Mapping):
            raise InputError("tokenizer description must have kind 'word' and a 'vocab' map")
        vocab = {str(k): int(v) for k, v in data["vocab"].items()}
        return cls(vocab, lowercase=bool(data.get("lowercase", True)))
