"""The randomisation sanity check: copies leave the user's module bit-identical, the
cascade re-initialises layers output first, and the similarity figures are exact on maps
whose behaviour is known (a weight-free map never changes; a constant one has no rank)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.adapters.torch.randomisation import (
    SupportsWeightRandomisation,
    parameter_layers,
    randomised_module,
)
from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.evaluation.sanity import map_similarity, randomisation_test, ssim
from blackbox_vqa.explainers.guided_backprop import GuidedBackprop

from toys import TOY_ANSWERS, BrightnessModel, toy_tokenizer


class TinyConvNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> global mean -> + word embeddings -> linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.embedding = nn.Embedding(20, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv2(torch.relu(self.conv1(image)))).mean(dim=(2, 3))
        return self.head(features + self.embedding(tokens).sum(dim=1))


def tiny_adapter() -> TorchAdapter:
    return TorchAdapter(TinyConvNet(), TOY_ANSWERS, toy_tokenizer(), image_size=8,
                        device="cpu", name="tiny")


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_layers_are_listed_output_first() -> None:
    assert parameter_layers(TinyConvNet()) == ["head", "embedding", "conv2", "conv1"]
    adapter = tiny_adapter()
    assert isinstance(adapter, SupportsWeightRandomisation)
    assert adapter.randomisable_layers() == ["head", "embedding", "conv2", "conv1"]
    assert not isinstance(BrightnessModel(), SupportsWeightRandomisation)


def test_copies_leave_the_users_module_bit_identical_and_form_a_cascade() -> None:
    adapter = tiny_adapter()
    before = snapshot(adapter.module)
    rng_before = torch.random.get_rng_state()
    one = adapter.randomised_copy(1, seed=5)
    two = adapter.randomised_copy(2, seed=5)
    after = snapshot(adapter.module)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng_before, torch.random.get_rng_state())
    assert one.module is not adapter.module and two.module is not adapter.module
    first, second = snapshot(one.module), snapshot(two.module)
    for key in before:
        layer = key.split(".")[0]
        assert torch.equal(first[key], before[key]) == (layer != "head"), key
        assert torch.equal(second[key], before[key]) == (layer not in ("head", "embedding")), key
        if layer == "head":  # one seeded stream: the same new head in both copies
            assert torch.equal(first[key], second[key])
    again = snapshot(adapter.randomised_copy(2, seed=5).module)
    assert all(torch.equal(again[k], second[k]) for k in again)
    assert snapshot(adapter.randomised_copy(0, seed=5).module).keys() == before.keys()
    with pytest.raises(InputError, match=r"layers must be an int in \[0, 4\]"):
        adapter.randomised_copy(5, seed=0)
    with pytest.raises(InputError, match="seed must be a non-negative int"):
        randomised_module(adapter.module, 1, -1)


def test_users_module_is_untouched_after_gradients_on_copies() -> None:
    adapter = tiny_adapter()
    before = snapshot(adapter.module)
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)

    def explain(model: object) -> np.ndarray:
        return GuidedBackprop(model).explain(image, "what color is the shape").image_map

    result = randomisation_test(adapter, explain, method="guided", seed=1)
    assert [s.layer for s in result.steps] == ["head", "embedding", "conv2", "conv1"]
    assert [s.layers for s in result.steps] == [1, 2, 3, 4]
    assert result.evaluations == 5
    after = snapshot(adapter.module)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in adapter.module.parameters())


def test_a_weight_free_map_never_changes_and_fails() -> None:
    image = np.random.default_rng(1).random((6, 5))
    result = randomisation_test(tiny_adapter(), lambda model: image, method="edges")
    assert all(s.spearman == pytest.approx(1.0) and s.ssim == pytest.approx(1.0)
               for s in result.steps)
    assert not result.passes and result.first_below is None
    data = result.to_dict()
    assert data["passes"] is False and data["final_spearman"] == pytest.approx(1.0)
    assert len(data["steps"]) == 4 and data["steps"][0]["layer"] == "head"


def test_a_map_that_dies_with_the_weights_passes() -> None:
    original = np.arange(12.0).reshape(3, 4)
    adapter = tiny_adapter()

    def explain(model: object) -> np.ndarray:
        return original if model is adapter else np.zeros((3, 4))

    result = randomisation_test(adapter, explain, layers=2, threshold=0.3)
    assert [s.layer for s in result.steps] == ["head", "embedding"]
    assert math.isnan(result.final_spearman) and result.passes
    assert result.first_below == "head"
    # SSIM of a map against an all-zero one, by hand: x = 0 gives C1 C2 / ((my^2 + C1)
    # (vy + C2)) at every pixel, averaged
    assert result.steps[0].ssim == pytest.approx(ssim(original, np.zeros((3, 4))))
    assert result.to_dict()["final_spearman"] is None


def test_ssim_and_spearman_by_hand() -> None:
    ones = np.ones((5, 5))
    assert ssim(ones, ones) == pytest.approx(1.0)
    # x = 0, y = 1 everywhere: means 0 and 1, no variance -> C1 / (1 + C1)
    assert ssim(np.zeros((5, 5)), ones) == pytest.approx(1e-4 / (1 + 1e-4))
    # scaled by the maximum: 2 y and y are the same map
    y = np.random.default_rng(2).random((7, 9))
    assert ssim(2 * y, -y) == pytest.approx(1.0)
    a, b = np.random.default_rng(3).random((2, 6, 6))
    rho, _ = map_similarity(a, -b)
    assert rho == pytest.approx(stats.spearmanr(a.reshape(-1), b.reshape(-1))[0])
    with pytest.raises(InputError, match="maps to compare have shapes"):
        map_similarity(a, b[:3])


def test_models_without_the_capability_are_refused() -> None:
    with pytest.raises(NotSupportedError, match="cannot randomise its weights"):
        randomisation_test(BrightnessModel(), lambda m: np.zeros((2, 2)))
    with pytest.raises(InputError, match="layers must be an int"):
        randomisation_test(tiny_adapter(), lambda m: np.zeros((2, 2)), layers=0)
    with pytest.raises(InputError, match="threshold must be in"):
        randomisation_test(tiny_adapter(), lambda m: np.zeros((2, 2)), threshold=0.0)
