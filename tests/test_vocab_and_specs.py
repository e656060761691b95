"""``--vocab`` files (special tokens refused, tokenizer.json read) and factory specs
(current directory importable, ``?key=value`` arguments)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from blackbox_vqa.adapters.onnx.runtime import read_vocab
from blackbox_vqa.adapters.vocab_files import is_special_token
from blackbox_vqa.errors import InputError, ModelLoadError
from blackbox_vqa.specs import factory_arguments, load_model, spec_kind


def _tokenizer_json(kind: str, vocab: dict[str, int], *, unk: str = "[UNK]",
                    lowercase: bool = True) -> dict[str, object]:
    added = [{"id": i, "content": w, "special": True} for w, i in vocab.items()
             if w.startswith("[")]
    normalizer = {"type": "Lowercase"} if lowercase else None
    return {"version": "1.0", "added_tokens": added, "normalizer": normalizer,
            "model": {"type": kind, "vocab": vocab, "unk_token": unk}}


def test_word_list_with_special_tokens_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\n[CLS]\nwhat\ncolor\n")
    with pytest.raises(InputError, match=r"special tokens \(\[PAD\], \[UNK\], \[CLS\]\)"):
        read_vocab(path)
    (tmp_path / "map.json").write_text(json.dumps({"<pad>": 0, "what": 2}))
    with pytest.raises(InputError, match="shift by 2"):
        read_vocab(tmp_path / "map.json")


def test_word_level_tokenizer_json_is_read(tmp_path: Path) -> None:
    vocab = {"[PAD]": 0, "[UNK]": 1, "what": 2, "color": 3, "shape": 4}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_tokenizer_json("WordLevel", vocab)))
    tokenizer = read_vocab(path)
    assert tokenizer("What COLOR zebra shape") == [2, 3, 1, 4]
    path.write_text(json.dumps(_tokenizer_json("WordLevel", vocab, lowercase=False)))
    assert read_vocab(path)("What color") == [1, 3]


def test_tokenizer_json_with_other_ids_or_sub_words_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    shifted = {"[UNK]": 0, "[PAD]": 1, "what": 2}
    path.write_text(json.dumps(_tokenizer_json("WordLevel", shifted)))
    with pytest.raises(InputError, match="padding token with id 0"):
        read_vocab(path)
    path.write_text(json.dumps(_tokenizer_json("WordPiece", {"[PAD]": 0, "[UNK]": 1})))
    with pytest.raises(InputError, match=r"WordPiece tokenizer.*hf:PATH"):
        read_vocab(path)


def test_special_token_shapes() -> None:
    specials = ("[PAD]", "[unused1]", "<pad>", "</s>", "<|endoftext|>")
    assert all(is_special_token(t) for t in specials)
    assert not any(is_special_token(t) for t in ("what", "<", "[", "t-shirt"))


def test_factory_arguments_are_typed() -> None:
    assert factory_arguments("size=64&scale=0.5&name=small&on=true&x=none") == {
        "size": 64, "scale": 0.5, "name": "small", "on": True, "x": None}
    assert factory_arguments("") == {}
    with pytest.raises(InputError, match="key=value"):
        factory_arguments("size")
    assert spec_kind("pkg.mod:make?size=64") == "factory"


def test_factory_from_the_current_directory_with_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_models_hf12.py").write_text(
        "from toys import BrightnessModel\n"
        "def make(name='plain', size=1):\n"
        "    model = BrightnessModel()\n"
        "    model.name = f'{name}-{size}'\n"
        "    return model\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model = load_model("my_models_hf12:make?name=small&size=3")
    assert getattr(model, "name", None) == "small-3"
    with pytest.raises(ModelLoadError, match="unexpected keyword"):
        load_model("my_models_hf12:make?colour=red")
