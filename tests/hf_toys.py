"""Tiny random-weight ViLT and BLIP models built from configs, saved with ``save_pretrained``.

Nothing is downloaded: the vocabulary is written here, the processors are built from their
classes. Weights are drawn wide (``initializer_range`` 0.5) so that answers differ
between inputs. Importable as ``hf_toys`` (tests/ is on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]",
    "what", "color", "is", "the", "shape", "how", "many", "are", "there", "red", "blue",
    "green", "circle", "square", "yes", "no", "two", "##s", "?", "a", "in", "image",
]
VILT_ANSWERS = ["red", "blue", "green", "yes", "no"]
BLIP_ANSWERS = ["red", "blue", "yes", "two"]


def write_vocab(folder: Path) -> Path:
    """A BERT-style ``vocab.txt`` (one token a line; ids are line numbers)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return path


def build_vilt(folder: Path, *, image_size: int = 64, seed: int = 0) -> Path:
    """A 2-layer ViLT (hidden 32, patches 16 px) for ``image_size`` images; returns the folder."""
    from transformers import (
        BertTokenizerFast,
        ViltConfig,
        ViltForQuestionAnswering,
        ViltImageProcessorPil,
        ViltProcessor,
    )

    vocab = write_vocab(folder / "_vocab")
    config = ViltConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        image_size=image_size, patch_size=16, max_position_embeddings=24,
        vocab_size=len(WORDS), initializer_range=0.5, max_image_length=-1,
        id2label=dict(enumerate(VILT_ANSWERS)),
        label2id={a: i for i, a in enumerate(VILT_ANSWERS)},
    )
    torch.manual_seed(seed)
    model = ViltForQuestionAnswering(config).eval()
    processor = ViltProcessor(
        image_processor=ViltImageProcessorPil(size={"shortest_edge": image_size},
                                              size_divisor=16),
        tokenizer=BertTokenizerFast(str(vocab)),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_blip(folder: Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """A 1-layer BLIP VQA model (hidden 32, patches 16 px); ``[DEC]`` starts answers."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    vocab = write_vocab(folder / "_vocab")
    ids = {w: i for i, w in enumerate(WORDS)}
    text = {
        "vocab_size": len(WORDS), "hidden_size": 32, "encoder_hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": 24, "initializer_range": 0.5,
        "pad_token_id": ids["[PAD]"], "bos_token_id": ids["[DEC]"],
        "sep_token_id": ids["[SEP]"], "eos_token_id": ids["[SEP]"],
    }
    vision = {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": image_size, "patch_size": 16,
        "initializer_range": 0.5,
    }
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32,
                        initializer_range=0.5)
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(config).eval()
    tokenizer = BertTokenizerFast(str(vocab), bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_answers(path: Path, answers: list[str]) -> Path:
    """An answers file: one candidate a line."""
    path.write_text("\n".join(answers) + "\n", encoding="utf-8")
    return path
