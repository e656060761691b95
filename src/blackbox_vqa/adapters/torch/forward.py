"""Running a wrapped PyTorch module: eval mode for a block, gradients through it, and
scores from logits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

__all__ = ["eval_mode", "full_float32", "gradient_mode", "scores_from_logits"]


def scores_from_logits(logits: torch.Tensor, output: str) -> torch.Tensor:
    """Turn module outputs into scores: softmax, sigmoid or identity (``"probs"``)."""
    if output == "softmax":
        return torch.softmax(logits, dim=-1)
    if output == "sigmoid":
        return torch.sigmoid(logits)
    return logits


_TF32_LOCK = threading.Lock()
_tf32_depth = 0
_tf32_saved = False


@contextmanager
def full_float32() -> Iterator[None]:
    """cuDNN convolutions in full float32 (no TF32) for the block; nothing on CPU.

    PyTorch lets cuDNN run float32 convolutions in TF32 by default (10-bit mantissa), which
    moved the reference model's occlusion scores by up to 3e-5 from the CPU's on an H200;
    with TF32 off they agree to about 1e-7 (tests/test_cuda.py). The global flag is set by
    the first block to enter and restored by the last to leave (blocks may overlap across
    threads)."""
    global _tf32_depth, _tf32_saved
    if not torch.cuda.is_available():
        yield
        return
    with _TF32_LOCK:
        if _tf32_depth == 0:
            _tf32_saved = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
        _tf32_depth += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _tf32_depth -= 1
            if _tf32_depth == 0:
                torch.backends.cudnn.allow_tf32 = _tf32_saved


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block, restoring its training flags after; on
    CUDA the block's convolutions run in full float32 (:func:`full_float32`), as on CPU."""
    flags = [(m, m.training) for m in module.modules()]
    training = any(flag for _, flag in flags)
    if training:  # (already in eval mode: skip the slow attribute-setting walks)
        module.eval()
    try:
        with full_float32():
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
