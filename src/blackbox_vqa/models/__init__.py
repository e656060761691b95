"""The built-in reference VQA model (spec ``easyvqa``): network, training, shipped weights.

:func:`load_reference_model` returns the network, tokenizer, answers and preprocessing;
:func:`reference_adapter` returns it behind a
:class:`~blackbox_vqa.adapters.torch.module.TorchAdapter`. Training lives in
:mod:`blackbox_vqa.models.training` (imported on demand).
"""

from __future__ import annotations

from blackbox_vqa.models.easyvqa_net import EasyVQANet, NetConfig
from blackbox_vqa.models.reference import (
    WEIGHTS_DIR,
    load_reference_metadata,
    load_reference_model,
    reference_adapter,
)

__all__ = [
    "WEIGHTS_DIR",
    "EasyVQANet",
    "NetConfig",
    "load_reference_metadata",
    "load_reference_model",
    "reference_adapter",
]
