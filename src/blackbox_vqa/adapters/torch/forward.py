"""Running a wrapped PyTorch module: eval mode for a block, gradients through it, and
scores from logits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

__all__ = ["eval_mode", "gradient_mode", "scores_from_logits"]


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


_RNN_NAMES = frozenset({"RNN", "LSTM", "GRU"})


def _cuda_rnn(module: nn.Module) -> bool:
    """Whether ``module`` runs a recurrent layer on CUDA (a TorchScript one included)."""
    on_cuda = any(p.device.type == "cuda" for p in module.parameters())
    return on_cuda and any(
        isinstance(m, nn.RNNBase) or getattr(m, "original_name", "") in _RNN_NAMES
        for m in module.modules()
    )


@contextmanager
def gradient_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with gradients on, for a forward pass that will be differentiated.

    cuDNN's recurrent layers can be differentiated only in training mode ("cudnn RNN
    backward can only be called in training mode"), and training mode would turn dropout
    on; so for a module with a recurrent layer on CUDA, cuDNN is off within the block and
    the layers run PyTorch's own kernels, in eval mode, with the same values.
    """
    with ExitStack() as stack:
        stack.enter_context(eval_mode(module))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if _cuda_rnn(module):
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield module
