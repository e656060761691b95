"""The built-in reference model (model spec ``easyvqa``): shipped weights and loaders.

The weights are a plain ``state_dict`` (``easyvqa.pt``, read with
``torch.load(..., weights_only=True)``) beside a JSON file (``easyvqa.json``) holding the
answers, the tokenizer, the network sizes, the image preprocessing and how the weights
were trained and how well they did on the easy-VQA test split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blackbox_vqa.errors import ModelLoadError
from blackbox_vqa.models.easyvqa_net import EasyVQANet, NetConfig
from blackbox_vqa.text import WordTokenizer

if TYPE_CHECKING:
    from blackbox_vqa.adapters.torch.module import TorchAdapter

__all__ = [
    "METADATA_FILE",
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "load_reference_metadata",
    "load_reference_model",
    "reference_adapter",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "easyvqa.pt"
METADATA_FILE = "easyvqa.json"


def load_reference_metadata(directory: str | Path | None = None) -> dict[str, Any]:
    """The JSON description of the weights in ``directory`` (default: the shipped ones)."""
    path = Path(directory if directory is not None else WEIGHTS_DIR) / METADATA_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"reference model description not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read reference model description {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(
        key in data for key in ("answers", "tokenizer", "architecture", "preprocessing")
    ):
        raise ModelLoadError(
            f"{path} lacks one of 'answers', 'tokenizer', 'architecture', 'preprocessing'"
        )
    return data


def load_reference_model(
    directory: str | Path | None = None,
) -> tuple[EasyVQANet, WordTokenizer, list[str], dict[str, Any]]:
    """Load the reference model from ``directory`` (default: the weights shipped inside
    the package).

    Returns ``(module, tokenizer, answers, preprocessing)``: the network in eval mode on
    the CPU, its tokenizer, the answer list (index-aligned with the logits) and a dict
    with ``image_size`` ``[H, W]``, ``mean``, ``std`` (0-1 scale) and ``output``.
    Raises :class:`ModelLoadError` when the files are missing or do not fit together.
    """
    folder = Path(directory if directory is not None else WEIGHTS_DIR)
    meta = load_reference_metadata(folder)
    weights = folder / str(meta.get("weights", WEIGHTS_FILE))
    try:
        tokenizer = WordTokenizer.from_dict(meta["tokenizer"])
        module = EasyVQANet(NetConfig.from_dict(meta["architecture"]))
        state = torch.load(weights, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"reference model weights not found: {weights}") from exc
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load reference model from {folder}: {type(exc).__name__}: {exc}"
        ) from exc
    module.eval()
    answers = [str(a) for a in meta["answers"]]
    if len(answers) != module.config.num_answers:
        raise ModelLoadError(
            f"{folder}: {len(answers)} answers but the network has "
            f"{module.config.num_answers} outputs"
        )
    preprocessing = dict(meta["preprocessing"])
    return module, tokenizer, answers, preprocessing


def reference_adapter(
    directory: str | Path | None = None, *, name: str = "easyvqa"
) -> TorchAdapter:
    """The reference model behind a :class:`~blackbox_vqa.adapters.torch.module.TorchAdapter`."""
    from blackbox_vqa.adapters.torch.module import TorchAdapter

    module, tokenizer, answers, pre = load_reference_model(directory)
    return TorchAdapter(
        module,
        answers,
        tokenizer,
        image_size=tuple(int(v) for v in pre["image_size"]),
        mean=tuple(float(v) for v in pre["mean"]),
        std=tuple(float(v) for v in pre["std"]),
        output=pre.get("output", "softmax"),
        name=name,
    )
