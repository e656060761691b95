"""Inputs of Hugging Face VQA models from images and questions, shared by the PyTorch
(:class:`~blackbox_vqa.adapters.hf.vqa.HfAdapter`) and the ONNX
(:class:`~blackbox_vqa.adapters.hf.onnx.HfOnnxAdapter`) adapters.

Images go through the model's own image processor without rounding: every image (uint8
or float32 on the 0-255 scale) is resized in 32-bit float with the processor's filter and
output size (Pillow's ``"F"`` mode for Pillow-based processors), then the processor
rescales, normalises and pads it (``do_resize=False``). Pillow resizes in two passes
(width, then height); each pass is clipped to 0-255 here as Pillow's 8-bit passes clip
the filter's overshoot, so on uint8 images this differs from the processor's own pipeline
only by its rounding to whole 0-255 levels (half a level per pass, about one level at
most); images already at the model's size are identical. Processors that are not
Pillow-based (torchvision) get float tensors and resize them themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import ImageArray
from blackbox_vqa.errors import ModelError, QuestionError
from blackbox_vqa.text import validate_question, word_spans

__all__ = ["HfProcessing", "hf_score_semantics", "word_positions"]


def word_positions(
    question: str, offsets: Sequence[tuple[int, int]]
) -> tuple[tuple[int, ...], ...]:
    """For each word of ``question`` (``text.word_spans``), the token positions inside it.

    ``offsets`` are the tokenizer's character spans per token (``(0, 0)`` for special
    tokens). A token belongs to the word its span overlaps; punctuation and special tokens
    belong to none.
    """
    spans = word_spans(question)
    out: list[list[int]] = [[] for _ in spans]
    for position, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        for index, (w_start, w_end) in enumerate(spans):
            if start < w_end and end > w_start:
                out[index].append(position)
                break
    return tuple(tuple(p) for p in out)


class HfProcessing:
    """Tokenizer and image processor of one model, with this package's input rules.

    Args:
        processor: the model's processor (``tokenizer`` and ``image_processor``).
        max_text_tokens: the model's maximum text positions (0: unchecked).
        text_names: the text tensors the model takes (``input_ids``, ``attention_mask``,
            ``token_type_ids``...).
        name: the model's display name, for messages.
    """

    def __init__(
        self,
        processor: Any,
        *,
        max_text_tokens: int,
        text_names: Sequence[str],
        name: str,
    ) -> None:
        self.tokenizer: Any = getattr(processor, "tokenizer", None)
        self.image_processor: Any = getattr(processor, "image_processor", None)
        if self.tokenizer is None or self.image_processor is None:
            raise ModelError(
                f"{name}: the processor {type(processor).__name__} lacks a tokenizer or an "
                "image processor"
            )
        self.max_text_tokens = int(max_text_tokens)
        self.text_names = tuple(text_names)
        self.name = name
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}

    @property
    def takes_pixel_mask(self) -> bool:
        """Whether the image processor produces a ``pixel_mask`` (ViLT's does)."""
        return "pixel_mask" in getattr(self.image_processor, "model_input_names", ())

    def validate_question(self, question: str) -> str:
        """The stripped question; :class:`QuestionError` if it is longer than the model takes."""
        question = validate_question(question)
        count = len(self.tokenizer(question)["input_ids"])
        if self.max_text_tokens and count > self.max_text_tokens:
            raise QuestionError(
                f"question has {count} tokens but {self.name} takes at most "
                f"{self.max_text_tokens} (its maximum text positions)"
            )
        return question

    def pixels(self, images: Sequence[ImageArray]) -> dict[str, torch.Tensor]:
        """``pixel_values float32 [B, 3, H, W]`` (and ``pixel_mask int64 [B, H, W]`` where the
        processor makes one) for RGB arrays on the 0-255 scale, on the CPU."""
        floats = [np.asarray(image, dtype=np.float32) for image in images]
        if _pillow_backend(self.image_processor):
            batch: list[Any] = [self._resized(image) for image in floats]
            kwargs: dict[str, Any] = {"do_resize": False, "input_data_format": "channels_last"}
        else:
            batch = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image in floats]
            kwargs = {"input_data_format": "channels_first"}
        try:
            encoded = self.image_processor(images=batch, return_tensors="pt", **kwargs)
        except Exception as exc:
            raise ModelError(
                f"{self.name}: the image processor failed: {type(exc).__name__}: {exc}"
            ) from exc
        out = {"pixel_values": encoded["pixel_values"].float()}
        if "pixel_mask" in encoded:
            out["pixel_mask"] = encoded["pixel_mask"].long()
        return out

    def text(self, questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's text tensors ``[B, T]`` (int64), right-padded to the longest question."""
        encoded = self.tokenizer(list(questions), padding="longest", return_tensors="pt")
        return {k: v.long() for k, v in encoded.items() if k in self.text_names}

    def word_positions(self, question: str) -> tuple[tuple[int, ...], ...]:
        """For each word of ``question``, its token positions (see :func:`word_positions`).

        From the tokenizer's character offsets; a tokenizer without them (a slow, Python
        one) is asked for the tokens of each prefix of the question instead: the tokens
        between the prefix ending before a word and the one ending after it are the word's.
        """
        try:
            offsets = self.tokenizer(question, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, KeyError, TypeError, ValueError):
            return self._prefix_positions(question)
        return word_positions(question, offsets)

    def _prefix_positions(self, question: str) -> tuple[tuple[int, ...], ...]:
        ids = list(self.tokenizer(question)["input_ids"])
        special = set(getattr(self.tokenizer, "all_special_ids", ()))
        lead = next((i for i, t in enumerate(ids) if t not in special), len(ids))
        out = []
        for start, end in word_spans(question):
            first = len(self.tokenizer.tokenize(question[:start]))
            last = len(self.tokenizer.tokenize(question[:end]))
            out.append(tuple(range(lead + first, lead + last)))
        return tuple(out)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The processor's resized ``(H, W)`` for an ``H x W`` image (asked once per size)."""
        if (height, width) not in self._sizes:
            probe = np.zeros((height, width, 3), dtype=np.uint8)
            out = self.image_processor(images=[probe], return_tensors="np")
            mask = out.get("pixel_mask")
            if mask is not None:
                rows, cols = np.asarray(mask[0]).nonzero()
                size = (int(rows.max()) + 1, int(cols.max()) + 1)
            else:
                shape = np.asarray(out["pixel_values"]).shape
                size = (int(shape[-2]), int(shape[-1]))
            self._sizes[(height, width)] = size
        return self._sizes[(height, width)]

    def _resized(self, image: NDArray[np.float32]) -> NDArray[np.float32]:
        """``image`` resized in float32 to the processor's output size with its filter."""
        from PIL import Image

        height, width = image.shape[:2]
        size = self.output_size(height, width)
        if size == (height, width):
            return image
        resample = getattr(self.image_processor, "resample", None)
        filter_ = int(resample) if resample is not None else int(Image.Resampling.BILINEAR)
        return np.stack([_resize_channel(image[..., c], size, filter_)
                         for c in range(image.shape[2])], axis=-1)


def _pillow_backend(image_processor: Any) -> bool:
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # transformers < 5: every slow image processor resizes with Pillow
        return not type(image_processor).__name__.endswith("Fast")
    return isinstance(image_processor, PilBackend)


def _resize_channel(
    channel: NDArray[np.float32], size: tuple[int, int], resample: int
) -> NDArray[np.float32]:
    """Pillow's two-pass resize of one ``H x W`` channel in 32-bit float: columns first,
    then rows, each pass clipped to 0-255 as Pillow's 8-bit passes are (without their
    rounding to whole levels)."""
    from PIL import Image

    height, _ = channel.shape
    out = np.ascontiguousarray(channel, dtype=np.float32)
    if out.shape[1] != size[1]:
        out = np.asarray(Image.fromarray(out, mode="F").resize((size[1], height), resample))
        out = np.clip(out, 0.0, 255.0)
    if height != size[0]:
        out = np.asarray(Image.fromarray(out, mode="F").resize((size[1], size[0]), resample))
        out = np.clip(out, 0.0, 255.0)
    return out.astype(np.float32, copy=False)


def hf_score_semantics(output: str) -> dict[str, str]:
    """What an HF model's scores are, for ``explanation.json``: ``{"kind": "sigmoid" |
    "softmax" | "candidate-normalised", "note": ...}``."""
    notes = {
        "sigmoid": "independent sigmoids of the classifier's logits (multi-label, as the "
        "model was trained); they need not sum to 1",
        "softmax": "softmax of the classifier's logits",
        "candidates": "softmax over the candidate answers of each candidate's total "
        "log-likelihood (answer tokens plus end-of-sequence) under teacher forcing; "
        "probabilities relative to the candidates, not the model's own",
    }
    kind = "candidate-normalised" if output == "candidates" else output
    return {"kind": kind, "note": notes[output]}
