"""A random ViLT-B/32-sized VQA model and a real easy-VQA input, for the ViLT benchmarks.

``build`` saves ``ViltForQuestionAnswering`` with ``ViltConfig()``'s defaults (hidden 768,
12 layers, 12 heads, 32-px patches, 384-px images; 117.6 M parameters) and a VQA-sized
head of 3,129 answers, random weights (seed 0), with a word-level BERT tokenizer whose
vocabulary is every word of the easy-VQA training questions. ``easyvqa_example`` is the
first easy-VQA test image, resized to the processor's 384 x 384, and its first question.
Nothing is downloaded. Imported by ``token_occlusion_vilt.py`` and ``hf_onnx_vs_torch.py``
(this folder on ``sys.path``, as when they run as scripts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ANSWERS = 3129
SIZE = 384


def easyvqa_words() -> list[str]:
    """Every word of the easy-VQA training questions (``?`` split off), sorted."""
    import easy_vqa

    words: set[str] = set()
    for question in easy_vqa.get_train_questions()[0]:
        words.update(str(question).replace("?", " ?").split())
    return sorted(words)


def build(folder: Path, *, seed: int = 0) -> Path:
    """A random ViLT-B/32-sized VQA model and its processor, saved in ``folder``."""
    from transformers import (
        BertTokenizerFast,
        ViltConfig,
        ViltForQuestionAnswering,
        ViltImageProcessorPil,
        ViltProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + easyvqa_words()) + "\n", encoding="utf-8")
    labels = {i: f"answer{i}" for i in range(ANSWERS)}
    config = ViltConfig(id2label=labels, label2id={v: k for k, v in labels.items()},
                        max_image_length=-1)
    torch.manual_seed(seed)
    model = ViltForQuestionAnswering(config).eval()
    processor = ViltProcessor(
        image_processor=ViltImageProcessorPil(size={"shortest_edge": SIZE}),
        tokenizer=BertTokenizerFast(str(vocab)),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def easyvqa_example(size: int = SIZE) -> tuple[NDArray[np.uint8], str]:
    """The first easy-VQA test image (64 x 64, bilinear to ``size x size``) and its first
    question (``"what is the red shape?"``)."""
    import easy_vqa
    from PIL import Image

    questions, _answers, image_ids = easy_vqa.get_test_questions()
    path = easy_vqa.get_test_image_paths()[image_ids[0]]
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8), str(questions[0])
