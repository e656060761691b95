"""Model factories for the ``bbvqa evaluate`` tests (specs ``eval_toys:NAME``).

Importable in worker and child processes: tests/ is on ``sys.path`` in the test process
(conftest.py) and is passed to subprocesses with ``PYTHONPATH=tests``. Torch is imported
only by :func:`torch_toy`, so the other factories start fast in a fresh process.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from blackbox_vqa.adapters.base import BaseAdapter

SLOW_CALL_S = 0.1


class SlowBrightness(BaseAdapter):
    """``bright`` with probability mean pixel / 255, else ``dark``; sleeps per batch."""

    def __init__(self) -> None:
        super().__init__(["dark", "bright"], name="slow-brightness")

    def _predict_batch(self, images: list[Any], questions: list[str]) -> np.ndarray:
        time.sleep(SLOW_CALL_S)
        bright = np.array([float(np.asarray(i, dtype=np.float64).mean()) / 255.0
                           for i in images])
        return np.stack([1.0 - bright, bright], axis=1)


def slow_brightness() -> SlowBrightness:
    return SlowBrightness()


def torch_toy() -> Any:
    """A TorchAdapter (with gradients: conv + ReLU, word embeddings) over the 13 easy-VQA
    answers that knows every easy-VQA test question's words."""
    import easy_vqa
    import torch
    from torch import nn

    from blackbox_vqa.adapters.torch.module import TorchAdapter
    from blackbox_vqa.text import WordTokenizer

    class ToyConvNet(nn.Module):
        def __init__(self, vocab_size: int) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(7)
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.head = nn.Linear(6, 13)
            self.embedding = nn.Embedding(vocab_size, 13, padding_idx=0)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

        def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            pooled = torch.relu(self.conv(image)).mean(dim=(2, 3))
            return self.head(pooled) + self.embedding(tokens).sum(dim=1)

    texts, _, _ = easy_vqa.get_test_questions()
    tokenizer = WordTokenizer.build(texts)
    net = ToyConvNet(len(tokenizer.vocab) + 2)
    return TorchAdapter(net, easy_vqa.get_answers(), tokenizer, image_size=16,
                        device="cpu", name="torch-toy")
