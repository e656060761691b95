"""Running a wrapped PyTorch module: eval mode for a block, and scores from logits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["eval_mode", "scores_from_logits"]


def scores_from_logits(logits: torch.Tensor, output: str) -> torch.Tensor:
    """Turn module outputs into scores: softmax, sigmoid or identity (``"probs"``)."""
    if output == "softmax":
        return torch.softmax(logits, dim=-1)
    if output == "sigmoid":
        return torch.sigmoid(logits)
    return logits


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block, restoring its training flags after."""
    flags = [(m, m.training) for m in module.modules()]
    training = any(flag for _, flag in flags)
    if training:  # (already in eval mode: skip the slow attribute-setting walks)
        module.eval()
    try:
        yield module
    finally:
        if training or any(mod.training for mod, _ in flags):
            for mod, flag in flags:
                mod.training = flag
