"""The metadata an exported model carries so that it can be used on its own.

The same ``key -> text`` map is stored as ONNX ``metadata_props`` and as the extra files
of the exported PyTorch graph: the answers, the tokenizer (vocabulary and rules), the
image preprocessing and output kind, the tensor names, the schema version and the name of
the source model. Values are JSON text except the plain strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blackbox_vqa.errors import InputError, ModelLoadError
from blackbox_vqa.preprocess import Preprocessing
from blackbox_vqa.text import WordTokenizer

__all__ = ["EXPORT_SCHEMA", "KEYS", "ExportMetadata"]

EXPORT_SCHEMA = "blackbox_vqa.export/1"
_PREFIX = "blackbox_vqa."
KEYS = tuple(
    _PREFIX + key
    for key in (
        "schema",
        "answers",
        "tokenizer",
        "preprocessing",
        "source_model",
        "inputs",
        "word_embedding_dim",
        "graph_file",
        "version",
    )
)


@dataclass(frozen=True)
class ExportMetadata:
    """Everything an exported model needs besides its weights.

    Attributes:
        answers: answer vocabulary, index-aligned with the model's outputs.
        tokenizer: :meth:`WordTokenizer.to_dict` output.
        preprocessing: image size ``(H, W)``, ``mean``/``std`` on the 0-1 scale.
        output: ``"softmax"``, ``"sigmoid"`` or ``"probs"``.
        source_model: display name of the model that was exported.
        inputs: tensor names: ``image``, ``tokens``, ``output`` and, in the PyTorch graph,
            ``word_offsets`` (added to the embedding output; absent without one).
        word_embedding_dim: width ``D`` of the word embedding, or ``None``.
        graph_file: file name of the PyTorch graph exported beside the ONNX file.
        version: blackbox_vqa version that wrote the file.
    """

    answers: tuple[str, ...]
    tokenizer: Mapping[str, Any]
    preprocessing: Preprocessing
    output: str
    source_model: str
    inputs: Mapping[str, str]
    word_embedding_dim: int | None = None
    graph_file: str = ""
    version: str = ""

    def to_props(self) -> dict[str, str]:
        """The ``key -> text`` map written into the exported files."""
        pre = {**self.preprocessing.to_dict(), "output": self.output}
        values: dict[str, Any] = {
            "schema": EXPORT_SCHEMA,
            "answers": json.dumps(list(self.answers)),
            "tokenizer": json.dumps(dict(self.tokenizer), sort_keys=True),
            "preprocessing": json.dumps(pre),
            "source_model": self.source_model,
            "inputs": json.dumps(dict(self.inputs)),
            "word_embedding_dim": "" if self.word_embedding_dim is None
            else str(self.word_embedding_dim),
            "graph_file": self.graph_file,
            "version": self.version,
        }
        return {_PREFIX + key: str(value) for key, value in values.items()}

    @staticmethod
    def present(props: Mapping[str, str]) -> bool:
        """Whether ``props`` hold blackbox_vqa metadata at all."""
        return bool(props.get(_PREFIX + "schema"))

    @classmethod
    def from_props(cls, props: Mapping[str, str], *, source: str) -> ExportMetadata:
        """Read metadata written by :meth:`to_props`; :class:`ModelLoadError` if malformed."""
        schema = props.get(_PREFIX + "schema", "")
        if schema != EXPORT_SCHEMA:
            raise ModelLoadError(
                f"{source}: metadata schema {schema!r} is not {EXPORT_SCHEMA!r}"
            )
        try:
            pre = json.loads(props[_PREFIX + "preprocessing"])
            dim = props.get(_PREFIX + "word_embedding_dim", "")
            meta = cls(
                answers=tuple(str(a) for a in json.loads(props[_PREFIX + "answers"])),
                tokenizer=json.loads(props[_PREFIX + "tokenizer"]),
                preprocessing=Preprocessing.create(pre["image_size"], pre["mean"], pre["std"]),
                output=str(pre.get("output", "softmax")),
                source_model=props.get(_PREFIX + "source_model", ""),
                inputs=json.loads(props[_PREFIX + "inputs"]),
                word_embedding_dim=int(dim) if dim else None,
                graph_file=props.get(_PREFIX + "graph_file", ""),
                version=props.get(_PREFIX + "version", ""),
            )
            WordTokenizer.from_dict(meta.tokenizer)
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise ModelLoadError(f"{source}: malformed blackbox_vqa metadata: {exc}") from exc
        return meta

    def word_tokenizer(self) -> WordTokenizer:
        """The tokenizer rebuilt from its description."""
        return WordTokenizer.from_dict(self.tokenizer)
