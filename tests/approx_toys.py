"""Small VGG-shaped CNNs for approximate incremental occlusion (``bbvqa -m
approx_toys:vgg_model``): 3x3 convolutions and max pools whose projective field covers the
map after a few layers, a global-mean or flatten head, a bag-of-words question branch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from toys import TOY_ANSWERS, toy_tokenizer

SIZE = 48


class TinyVGG(nn.Module):
    """``forward(image [B,3,48,48], tokens [B,T]) -> logits [B,3]``: three blocks of two
    3x3 convolutions (8-16 channels) and a 2x2 max pool, then a global mean (``head=
    "pool"``) or a flatten and a linear layer (``head="flatten"``)."""

    def __init__(self, *, head: str = "pool", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        cin = 3
        for cout in (8, 12, 16):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head_kind = head
        self.flat = nn.Linear(16 * 6 * 6, 16)
        self.embedding = nn.Embedding(20, 6, padding_idx=0)
        self.question = nn.Linear(6, 16)
        self.head = nn.Linear(16, len(TOY_ANSWERS))
        for module in self.features:
            if isinstance(module, nn.Conv2d):  # activations keep their scale through depth
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.eval()

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        maps = self.features(image)
        if self.head_kind == "pool":
            pooled = maps.mean(dim=(2, 3))
        else:
            pooled = torch.tanh(self.flat(maps.flatten(1)))
        words = torch.tanh(self.question(self.embedding(tokens).sum(dim=1)))
        return self.head(pooled * words) * 4.0


def vgg_model(head: str = "pool") -> Any:
    """TorchAdapter over :class:`TinyVGG` at 48 x 48."""
    from blackbox_vqa.adapters.torch.module import TorchAdapter

    return TorchAdapter(TinyVGG(head=head), TOY_ANSWERS, toy_tokenizer(), image_size=SIZE,
                        device="cpu", name=f"tiny-vgg-{head}")
