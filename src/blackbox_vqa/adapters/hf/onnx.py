"""HfOnnxAdapter: a Hugging Face VQA classifier exported to ONNX, run by ONNX Runtime.

``export_hf_model`` (:mod:`blackbox_vqa.exporters.hf_onnx`) writes a folder with
``model.onnx`` (the model's own inputs: ``input_ids``, ``attention_mask``,
``token_type_ids``, ``pixel_values``, ``pixel_mask`` as the model takes them; output
``logits``), the processor's files (``tokenizer.json``, ``preprocessor_config.json``...)
and ``config.json``. The graph's ``metadata_props`` describe it (schema
``blackbox_vqa.hf-export/1``): the answers, the score kind and the input names, so the
adapter feeds exactly the inputs the graph declares. The model spec ``path.onnx`` loads
such a file with this adapter (``specs`` looks at the metadata).

Inputs are made by the same code as :class:`~blackbox_vqa.adapters.hf.vqa.HfAdapter`
(:mod:`~blackbox_vqa.adapters.hf.processing`). Images of different sizes are run in
separate calls, so no image is ever padded (the exported ViLT keeps every patch, which
equals the model's own forward when the pixel mask is all ones).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import BaseAdapter, ImageArray
from blackbox_vqa.adapters.hf import loading
from blackbox_vqa.adapters.hf.processing import HfProcessing, hf_score_semantics
from blackbox_vqa.adapters.onnx.runtime import onnx_session
from blackbox_vqa.errors import (
    BlackboxVQAError,
    InputError,
    ModelError,
    ModelLoadError,
    NotSupportedError,
)

__all__ = ["HF_EXPORT_SCHEMA", "HfOnnxAdapter", "is_hf_export"]

HF_EXPORT_SCHEMA = "blackbox_vqa.hf-export/1"
_PREFIX = "blackbox_vqa."
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_INPUTS = ("pixel_values", "pixel_mask")


def hf_export_props(
    answers: Sequence[str], output: str, inputs: Sequence[str], source: str, note: str
) -> dict[str, str]:
    """The ``metadata_props`` of an exported Hugging Face model."""
    return {
        _PREFIX + "schema": HF_EXPORT_SCHEMA,
        _PREFIX + "answers": json.dumps(list(answers)),
        _PREFIX + "output": output,
        _PREFIX + "inputs": json.dumps(list(inputs)),
        _PREFIX + "source_model": source,
        _PREFIX + "export_note": note,
    }


def is_hf_export(path: str | os.PathLike[str]) -> bool:
    """Whether the ONNX file at ``path`` was written by ``export_hf_model``."""
    session = onnx_session(path)
    props = dict(session.get_modelmeta().custom_metadata_map)
    return props.get(_PREFIX + "schema") == HF_EXPORT_SCHEMA


class HfOnnxAdapter(BaseAdapter):
    """An exported Hugging Face classifier (``model.onnx`` and its processor beside it).

    Args:
        path: the ``model.onnx`` file (or the folder holding it).
        threads: ONNX Runtime intra-op threads (default: its own).
        providers: execution providers (default: CUDA when available, else CPU).
        name: display name.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        file = Path(path)
        if file.is_dir():
            file = file / "model.onnx"
        self.path = file
        self.session = onnx_session(file, threads=threads, providers=providers)
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        if props.get(_PREFIX + "schema") != HF_EXPORT_SCHEMA:
            raise ModelLoadError(f"{file} was not written by export_hf_model (no "
                                 f"{HF_EXPORT_SCHEMA} metadata)")
        try:
            answers = [str(a) for a in json.loads(props[_PREFIX + "answers"])]
            self.input_names = tuple(str(n) for n in json.loads(props[_PREFIX + "inputs"]))
            self.output = props[_PREFIX + "output"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{file}: malformed metadata: {exc}") from exc
        source = props.get(_PREFIX + "source_model", "")
        super().__init__(answers, name=name or (f"{source} (onnx)" if source else file.name))
        self.score_semantics = hf_score_semantics(self.output)
        declared = {i.name for i in self.session.get_inputs()}
        if set(self.input_names) != declared:
            raise ModelLoadError(
                f"{file}: metadata names inputs {sorted(self.input_names)}, the graph "
                f"{sorted(declared)}"
            )
        self.processing = _processing(file.parent, self.input_names, self.name)

    @classmethod
    def from_options(cls, path: str, extra: Mapping[str, Any]) -> HfOnnxAdapter:
        """Build from command-line options; ``threads`` is the only one used."""
        return cls(path, threads=extra.get("threads") or None)

    def validate_question(self, question: str) -> str:
        """The stripped question; :class:`QuestionError` if it is longer than the model takes."""
        return self.processing.validate_question(question)

    def _predict_batch(
        self, images: list[ImageArray], questions: list[str]
    ) -> NDArray[np.floating[Any]]:
        questions = [self.validate_question(q) for q in questions]
        out = np.empty((len(images), len(self.answers)), dtype=np.float64)
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, image in enumerate(images):
            groups.setdefault(tuple(np.shape(image)), []).append(row)
        for rows in groups.values():
            logits = self._logits([images[r] for r in rows], [questions[r] for r in rows])
            out[rows] = _scores(logits, self.output)
        return out

    def _logits(self, images: list[ImageArray], questions: list[str]) -> NDArray[np.float64]:
        tensors = {**self.processing.pixels(images), **self.processing.text(questions)}
        feeds = {name: tensors[name].numpy() for name in self.input_names}
        try:
            (logits,) = self.session.run(["logits"], feeds)
        except Exception as exc:
            raise ModelError(f"{self.name}: ONNX Runtime failed: "
                             f"{str(exc).strip().splitlines()[0]}") from exc
        return np.asarray(logits, dtype=np.float64)


def _processing(folder: Path, inputs: Sequence[str], name: str) -> HfProcessing:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise NotSupportedError(
            f"exported Hugging Face models need transformers for their processor ({exc}); "
            "pip install 'blackbox-vqa[hf]'"
        ) from exc
    try:
        config = loading.load_config(str(folder))
        processor: Any = loading.load_processor(str(folder))
    except BlackboxVQAError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the processor saved beside {folder / 'model.onnx'}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    missing = [n for n in inputs if n not in TEXT_INPUTS + IMAGE_INPUTS]
    if missing:
        raise NotSupportedError(f"{folder}: graph inputs {missing} are not ones this adapter "
                                "makes")
    return HfProcessing(
        processor,
        max_text_tokens=int(getattr(config, "max_position_embeddings", 0) or 0),
        text_names=[n for n in inputs if n in TEXT_INPUTS],
        name=name,
    )


def _scores(logits: NDArray[np.float64], output: str) -> NDArray[np.float64]:
    if output == "softmax":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]
    if output == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))  # type: ignore[no-any-return]
    raise InputError(f"unknown score kind {output!r} in the export metadata")
