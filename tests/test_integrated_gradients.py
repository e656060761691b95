"""Integrated gradients: quadrature rules, Captum equivalence on the reference model,
completeness, the refusal for models without gradients."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG

from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.adapters.torch.path_gradients import embedding_replaced
from blackbox_vqa.errors import GradientUnavailableError, InputError
from blackbox_vqa.explainers.integrated_gradients import (
    IntegratedGradients,
    baseline_embeddings,
    integrated_gradients_dict,
    path_points,
)
from blackbox_vqa.models.reference import reference_adapter

from toys import brightness_model

QUESTION = "what color is the circle"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter() -> TorchAdapter:
    return reference_adapter()


def _image() -> np.ndarray:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(64, 64, 3)).astype(np.uint8)
    image[16:40, 20:44] = (30, 40, 220)
    return image


def _captum(adapter: TorchAdapter, image: np.ndarray, baseline_rgb: np.ndarray, steps: int,
            target: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    module = adapter.module.eval()
    tensor, tokens = adapter.inputs([image], [QUESTION])
    start, _ = adapter.inputs([baseline_rgb], [QUESTION])
    embedding = module.embedding
    with torch.no_grad():
        words = embedding(tokens)
        pad = embedding.weight[0].expand_as(words)

    def forward(x: torch.Tensor, w: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        with embedding_replaced(embedding, w):
            return torch.softmax(module(x, tok), dim=-1)

    image_attr, word_attr = CaptumIG(forward).attribute(
        (tensor, words), baselines=(start, pad), target=target, n_steps=steps,
        additional_forward_args=(tokens,), internal_batch_size=16, method=method,
    )
    return image_attr[0].detach().double().numpy(), word_attr[0].detach().double().numpy()


@pytest.mark.parametrize(("baseline", "rule"), [("black", "gausslegendre"),
                                                 ("imagenet-mean", "riemann_middle")])
def test_equals_captum_on_the_reference_model(
    adapter: TorchAdapter, baseline: str, rule: str
) -> None:
    image = _image()
    result = IntegratedGradients(adapter, steps=24, baseline=baseline, rule=rule,
                                 batch_size=10).explain(image, QUESTION)
    rgb = {"black": (0.0, 0.0, 0.0), "imagenet-mean": (123.68, 116.779, 103.939)}[baseline]
    start = np.broadcast_to(np.asarray(rgb, dtype=np.float32), image.shape).copy()
    image_attr, word_attr = _captum(adapter, image, start, 24, result.answer_index, rule)
    assert np.abs(image_attr).max() > 1e-4
    np.testing.assert_allclose(result.attributions, image_attr, rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.word_map, word_attr.sum(axis=1), rtol=0, atol=1e-4)
    assert result.tokens == tuple(QUESTION.split())
    np.testing.assert_allclose(result.image_map, image_attr.sum(axis=0), rtol=0, atol=1e-4)


def test_completeness_is_reported_and_small_with_enough_steps(adapter: TorchAdapter) -> None:
    result = IntegratedGradients(adapter, steps=64, baseline="blur").explain(_image(), QUESTION)
    assert result.score_input == pytest.approx(result.probability, abs=1e-6)
    check = result.completeness()
    assert check["score_difference"] == pytest.approx(
        result.score_input - result.score_baseline)
    assert abs(result.completeness_gap) < 0.05 * max(abs(check["score_difference"]), 1e-3)


def test_batch_size_does_not_change_the_result(adapter: TorchAdapter) -> None:
    one = IntegratedGradients(adapter, steps=3, batch_size=1).explain(_image(), QUESTION)
    many = IntegratedGradients(adapter, steps=3, batch_size=8).explain(_image(), QUESTION)
    np.testing.assert_allclose(one.attributions, many.attributions, atol=1e-6)
    assert one.score_input == pytest.approx(many.score_input, abs=1e-6)
    assert one.score_baseline == pytest.approx(many.score_baseline, abs=1e-6)
    assert one.score_input != one.score_baseline


def test_json_section(adapter: TorchAdapter) -> None:
    import json

    result = IntegratedGradients(adapter, steps=4).explain(_image(), QUESTION)
    section = integrated_gradients_dict(result, attribution_file="ig.npy")
    assert json.loads(json.dumps(section))["image_size"] == [64, 64]
    assert len(section["words"]) == 5 and section["completeness"]["gap"] == pytest.approx(
        result.completeness_gap)


def test_another_answer_and_state_left_untouched(adapter: TorchAdapter) -> None:
    hooks = dict(adapter.module.embedding._forward_hooks)
    result = IntegratedGradients(adapter, steps=4).explain(_image(), QUESTION, answer="red")
    assert result.answer == "red"
    assert adapter.module.embedding._forward_hooks == hooks
    assert not any(p.grad is not None for p in adapter.module.parameters())


def test_path_points_sum_to_one_and_integrate_polynomials() -> None:
    for rule in ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                 "riemann_trapezoid"):
        alphas, weights = path_points(8, rule)
        assert weights.sum() == pytest.approx(1.0)
        assert np.all((alphas >= 0) & (alphas <= 1))
    alphas, weights = path_points(4)
    assert float(weights @ alphas**7) == pytest.approx(1 / 8)  # exact to degree 2n - 1
    with pytest.raises(InputError, match="steps"):
        path_points(0)
    with pytest.raises(InputError, match="rule"):
        path_points(4, "simpson")


def test_word_baseline_replaces_only_word_tokens(adapter: TorchAdapter) -> None:
    inputs = adapter.gradient_inputs(_image(), QUESTION)
    start = baseline_embeddings(inputs)
    assert np.array_equal(start, np.broadcast_to(inputs.pad_embedding, start.shape))


def test_models_without_gradients_are_refused() -> None:
    with pytest.raises(GradientUnavailableError, match="path gradients"):
        IntegratedGradients(brightness_model())
    with pytest.raises(InputError, match="baseline"):
        IntegratedGradients(reference_adapter(), baseline="grey")
