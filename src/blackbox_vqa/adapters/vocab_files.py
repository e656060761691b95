"""Vocabulary files for ``--vocab``: word lists, JSON maps, and Hugging Face ``tokenizer.json``.

:class:`~blackbox_vqa.text.WordTokenizer` reserves id 0 for padding and id 1 for unknown
words. A vocabulary that already holds its own special tokens (``[PAD]``, ``[UNK]``,
``<pad>``, ``[CLS]``...) was written for another tokenizer: read as a word list it would
shift every id by 2, so it is refused with a message that says what to do instead. A
``tokenizer.json`` of a word-level tokenizer whose padding and unknown tokens have ids 0
and 1 is read (its special tokens dropped); sub-word tokenizers (WordPiece, BPE,
Unigram) are refused, since their ids are not one per word. Words are still found by
this package's rule (``text.split_words``), lower-cased when the file's normalizer
lower-cases.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from blackbox_vqa.errors import InputError
from blackbox_vqa.text import PAD_ID, UNK_ID, WordTokenizer

__all__ = [
    "is_special_token",
    "read_json_vocab",
    "tokenizer_from_json",
    "tokenizer_from_words",
]

_SPECIAL_RE = re.compile(r"^(\[[A-Za-z_]\w*\]|<\|?/?[A-Za-z_]\w*\|?>)$")


def is_special_token(token: str) -> bool:
    """Whether ``token`` looks like a tokenizer's special token (``[PAD]``, ``<unk>``...)."""
    return bool(_SPECIAL_RE.match(token.strip()))


def _refuse_specials(words: list[str], path: object) -> None:
    specials = [w for w in words if is_special_token(w)]
    if specials:
        shown = ", ".join(specials[:4]) + (", ..." if len(specials) > 4 else "")
        raise InputError(
            f"--vocab file {path} holds special tokens ({shown}): it belongs to another "
            "tokenizer, and its ids would shift by 2 here (0 pads, 1 is unknown). Give a "
            "word-level tokenizer.json, a list of words only, or load a Hugging Face model "
            "with --model hf:PATH"
        )


def tokenizer_from_words(words: list[str], path: object) -> WordTokenizer:
    """One word a line: line ``i`` (from 0) gets id ``i + 2``; special tokens are refused."""
    _refuse_specials(words, path)
    return WordTokenizer({w: i + 2 for i, w in enumerate(words)})


def tokenizer_from_json(data: Mapping[str, Any], path: object) -> WordTokenizer | None:
    """A tokenizer from a Hugging Face ``tokenizer.json`` document, or ``None`` if ``data``
    is not one. A plain ``{word: id}`` map with special tokens is refused."""
    model = data.get("model")
    if not isinstance(model, Mapping):
        words = [str(k) for k in data]
        if any(is_special_token(w) for w in words):
            _refuse_specials(words, path)
        return None
    kind = model.get("type")
    if kind != "WordLevel":
        raise InputError(
            f"--vocab file {path} is a {kind or 'sub-word'} tokenizer; --vocab takes "
            "word-level vocabularies (one id per word). For a Hugging Face model use "
            "--model hf:PATH"
        )
    vocab = {str(k): int(v) for k, v in dict(model.get("vocab") or {}).items()}
    specials = {str(t.get("content")): int(t.get("id", -1))
                for t in data.get("added_tokens") or [] if t.get("special")}
    specials.update({w: i for w, i in vocab.items() if is_special_token(w)})
    unk = model.get("unk_token")
    pad_ids = [i for w, i in specials.items() if "pad" in w.lower()]
    unk_ids = [vocab.get(str(unk), -1)] if unk else []
    if pad_ids != [PAD_ID] or unk_ids != [UNK_ID] or set(specials.values()) - {PAD_ID, UNK_ID}:
        raise InputError(
            f"--vocab file {path}: its special tokens ({', '.join(sorted(specials)) or 'none'})"
            f" must be exactly a padding token with id {PAD_ID} and an unknown token with id "
            f"{UNK_ID}, as here"
        )
    kept = {w: i for w, i in vocab.items() if w not in specials}
    return WordTokenizer(kept, lowercase=_lowercases(data.get("normalizer")))


def _lowercases(normalizer: Any) -> bool:
    """Whether a ``tokenizer.json`` normalizer lower-cases its input."""
    if not isinstance(normalizer, Mapping):
        return False
    kind = normalizer.get("type")
    if kind == "Lowercase":
        return True
    if kind == "BertNormalizer":
        return bool(normalizer.get("lowercase", True))
    if kind == "Sequence":
        return any(_lowercases(part) for part in normalizer.get("normalizers") or [])
    return False


def read_json_vocab(text: str, path: object) -> WordTokenizer:
    """``WordTokenizer.to_dict()`` JSON, a ``tokenizer.json``, or a ``{word: id}`` map."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise InputError("expected a JSON object")
    if data.get("kind") == "word":
        return WordTokenizer.from_dict(data)
    tokenizer = tokenizer_from_json(data, path)
    if tokenizer is not None:
        return tokenizer
    return WordTokenizer({str(k): int(v) for k, v in data.items()})
