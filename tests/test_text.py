from __future__ import annotations

import pytest

from blackbox_vqa.errors import InputError, QuestionError
from blackbox_vqa.text import (
    WordTokenizer,
    drop_word,
    split_words,
    terminal_safe,
    validate_question,
    word_spans,
)


def test_split_words_keeps_inner_apostrophes_and_hyphens() -> None:
    assert split_words("What's the t-shirt's colour?") == ["What's", "the", "t-shirt's", "colour"]
    assert split_words("  is it red,blue ... or 3?") == ["is", "it", "red", "blue", "or", "3"]
    assert word_spans("a bc") == [(0, 1), (2, 4)]


@pytest.mark.parametrize(
    ("question", "index", "expected"),
    [
        ("what color is the shape?", 4, "what color is the?"),
        ("what color is the shape?", 0, "color is the shape?"),
        ("what color is the shape?", 2, "what color the shape?"),
        ("is it red, or blue?", 2, "is it, or blue?"),
        ("is the red shape red?", 2, "is the shape red?"),
        ("is the red shape red?", 4, "is the red shape?"),
        ("shape", 0, ""),
        ("  what   is  this ? ", 1, "what  this ?"),
    ],
)
def test_drop_word_rebuilds_the_question(question: str, index: int, expected: str) -> None:
    assert drop_word(question, index) == expected


def test_drop_word_index_out_of_range() -> None:
    with pytest.raises(InputError, match=r"word index must be in \[0, 2\), got 2"):
        drop_word("two words", 2)


@pytest.mark.parametrize("bad", ["", "   ", "\n\t", "?!", "..."])
def test_validate_question_refuses_empty(bad: str) -> None:
    with pytest.raises(QuestionError):
        validate_question(bad)


def test_validate_question_strips_and_refuses_non_strings() -> None:
    assert validate_question("  what?  ") == "what?"
    with pytest.raises(QuestionError, match="must be a string, got int"):
        validate_question(3)


def test_tokenizer_ids_unknowns_and_round_trip() -> None:
    tok = WordTokenizer.build(["What color is it?", "is it red"])
    assert dict(tok.vocab) == {"what": 2, "color": 3, "is": 4, "it": 5, "red": 6}
    assert tok("Is it BLUE?") == [4, 5, 1]
    assert tok.unknown_words("Is it BLUE?") == ["blue"]
    assert tok("?") == []
    again = WordTokenizer.from_dict(tok.to_dict())
    assert again == tok


def test_tokenizer_min_count_and_reserved_ids() -> None:
    tok = WordTokenizer.build(["a b", "a c"], min_count=2)
    assert dict(tok.vocab) == {"a": 2}
    with pytest.raises(InputError, match="reserved"):
        WordTokenizer({"x": 1})
    with pytest.raises(InputError, match="kind 'word'"):
        WordTokenizer.from_dict({"kind": "bpe"})


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("yes", "yes"),
        ("caf\u00e9 \u732b \\x1b", "caf\u00e9 \u732b \\x1b"),  # printable and backslashes kept
        ("\x1b]0;pwned\x07", r"\x1b]0;pwned\x07"),  # OSC: retitle the terminal
        ("\x1b[2J\x1b[Hok", r"\x1b[2J\x1b[Hok"),  # CSI: clear the screen
        ("a\x9b31mb", r"a\x9b31mb"),  # C1 one-byte CSI
        ("line\nfake prompt$ ", r"line\x0afake prompt$ "),
        ("tab\there\r\x00\x7f", r"tab\x09here\x0d\x00\x7f"),
        ("abc\u202edcba\u2066x\u2069\u2028", r"abc\u202edcba\u2066x\u2069\u2028"),
    ],
)
def test_terminal_safe_escapes_every_control_visibly(text: str, shown: str) -> None:
    safe = terminal_safe(text)
    assert safe == shown
    assert all(ch.isprintable() or ch == " " for ch in safe)


def test_terminal_safe_can_keep_newlines() -> None:
    assert terminal_safe("a\nb\x1b[1m", newlines=True) == "a\nb\\x1b[1m"
