"""Our occlusion image map equals Captum's ``Occlusion`` attribution on the same model.

Captum occludes the preprocessed tensor; we occlude the image as given and preprocess each
copy. With the image already at the model's input size (no resize), cells of equal size,
Captum's sliding window equal to a cell and the same fill colour in normalised space, the
two must agree per pixel. Captum is a test dependency only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion
from numpy.typing import NDArray
from torch import nn

from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.adapters.torch.preprocessing import to_tensor
from blackbox_vqa.explainers.masks import IMAGENET_MEAN_RGB
from blackbox_vqa.explainers.occlusion import Occlusion

from toys import toy_tokenizer

QUESTION = "what color is the shape"


class SmallVQANet(nn.Module):
    """Two conv layers with ``nn.ReLU`` modules, a bag-of-words question, product, linear."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.cnn = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.image_fc = nn.Linear(16 * 16, 24)
        self.embedding = nn.Embedding(20, 24, padding_idx=0)
        self.relu = nn.ReLU()
        self.out = nn.Linear(24, 5)
        with torch.no_grad():  # large enough weights that occluding a cell moves the scores
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        features = self.image_fc(self.cnn(image).flatten(1))
        question = self.embedding(tokens).sum(dim=1)
        return self.out(self.relu(features * question))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these tiny convolutions only lose time to thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter() -> TorchAdapter:
    return TorchAdapter(
        SmallVQANet(), ["a", "b", "c", "d", "e"], toy_tokenizer(), image_size=(64, 64),
        mean=(0.45, 0.5, 0.55), std=(0.2, 0.25, 0.3), device="cpu",
    )


def _image(height: int, width: int) -> NDArray[np.uint8]:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    image[height // 4 : height // 2, width // 3 : width // 2] = (250, 20, 20)
    return image


def _captum(
    adapter: TorchAdapter, image: NDArray[np.uint8], rgb: tuple[float, float, float],
    window: tuple[int, int], stride: tuple[int, int], target: int,
) -> NDArray[np.float64]:
    """Captum's attribution ``[3, H, W]`` on the preprocessed tensor of ``image``."""
    module = adapter.module.eval()
    tensor, tokens = adapter.inputs([image], [QUESTION])
    baseline = to_tensor(adapter.preprocessing, [np.full((1, 1, 3), rgb, dtype=np.float32)])

    def scores(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        return torch.softmax(module(x, tok), dim=-1)

    attribution = CaptumOcclusion(scores).attribute(
        tensor, sliding_window_shapes=(3, *window), strides=(3, *stride),
        baselines=baseline, target=target, additional_forward_args=(tokens,),
        perturbations_per_eval=64,
    )
    return attribution[0].double().numpy()


@pytest.mark.parametrize(
    ("baseline", "rgb"),
    [("imagenet-mean", IMAGENET_MEAN_RGB), ("black", (0.0, 0.0, 0.0)),
     ("10,200,30", (10.0, 200.0, 30.0))],
)
def test_grid_map_equals_captum(
    adapter: TorchAdapter, baseline: str, rgb: tuple[float, float, float]
) -> None:
    image = _image(64, 64)
    result = Occlusion(adapter, grid=16, baseline=baseline, words=False).explain(image, QUESTION)
    ours = np.kron(result.image_map, np.ones((4, 4)))  # 16 x 16 cells of 4 x 4 pixels
    theirs = _captum(adapter, image, rgb, (4, 4), (4, 4), result.answer_index)
    assert np.abs(result.image_map).max() > 1e-3  # the comparison is not between zeros
    np.testing.assert_allclose(theirs, np.broadcast_to(ours, theirs.shape), rtol=0, atol=1e-5)


def test_non_square_cells_and_another_answer_equal_captum() -> None:
    adapter = TorchAdapter(SmallVQANet(), ["a", "b", "c", "d", "e"], toy_tokenizer(),
                           image_size=(48, 64), device="cpu")
    image = _image(48, 64)
    predicted = int(np.argmax(adapter.answer_probs(image, QUESTION)))
    other = (predicted + 2) % 5
    result = Occlusion(adapter, grid=16, words=False).explain(
        image, QUESTION, answer=adapter.answers[other]
    )
    assert result.answer_index == other
    ours = np.kron(result.image_map, np.ones((3, 4)))  # cells of 3 x 4 pixels
    theirs = _captum(adapter, image, IMAGENET_MEAN_RGB, (3, 4), (3, 4), other)
    assert np.abs(result.image_map).max() > 1e-3
    np.testing.assert_allclose(theirs, np.broadcast_to(ours, theirs.shape), rtol=0, atol=1e-5)


def test_overlapping_windows_average_like_captum(adapter: TorchAdapter) -> None:
    image = _image(64, 64)
    result = Occlusion(adapter, window=8, stride=4, words=False).explain(image, QUESTION)
    assert result.image_map.shape == (64, 64)
    assert result.image_perturbations == 15 * 15  # starts 0, 4, ..., 56 on each side
    theirs = _captum(adapter, image, IMAGENET_MEAN_RGB, (8, 8), (4, 4), result.answer_index)
    assert np.abs(result.image_map).max() > 1e-3
    np.testing.assert_allclose(
        theirs, np.broadcast_to(result.image_map, theirs.shape), rtol=0, atol=1e-5
    )
