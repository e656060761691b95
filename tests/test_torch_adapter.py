from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from blackbox_vqa.adapters.torch.module import TorchAdapter, pad_tokens
from blackbox_vqa.errors import InputError, ModelError, ModelOutputError, QuestionError
from blackbox_vqa.preprocess import IMAGENET_MEAN, IMAGENET_STD

from toys import TOY_ANSWERS, LinearVQANet, toy_tokenizer


def adapter(**kwargs: object) -> TorchAdapter:
    options: dict[str, object] = {"image_size": 16, "device": "cpu"}
    options.update(kwargs)
    module = options.pop("module", LinearVQANet())
    return TorchAdapter(module, TOY_ANSWERS, toy_tokenizer(), **options)  # type: ignore[arg-type]


def expected_logits(net: LinearVQANet, rgb: tuple[int, int, int], ids: list[int],
                    mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> np.ndarray:
    """By hand: a flat image pools to (v/255 - mean)/std per channel."""
    pooled = np.array([(v / 255 - m) / s for v, m, s in zip(rgb, mean, std, strict=True)])
    weight = net.image_weight.detach().double().numpy()
    embed = net.embedding.weight.detach().double().numpy()
    return weight @ pooled + sum((embed[i] for i in ids), np.zeros(3))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("size", [16, 40])  # 40x40 is resized; a flat image stays flat
def test_probabilities_equal_the_hand_computation(size: int) -> None:
    net = LinearVQANet()
    model = adapter(module=net)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[...] = (200, 30, 90)
    probs = model.answer_probs(image, "What color is the shape?")
    ids = toy_tokenizer()("what color is the shape")
    np.testing.assert_allclose(probs, softmax(expected_logits(net, (200, 30, 90), ids)),
                               atol=1e-6)
    assert probs.dtype == np.float64 and probs.shape == (3,)


def test_sigmoid_and_probs_outputs_and_custom_normalisation() -> None:
    net = LinearVQANet()
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    ids = toy_tokenizer()("is there a red circle")
    logits = expected_logits(net, (128, 128, 128), ids, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    sig = adapter(module=net, output="sigmoid", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    np.testing.assert_allclose(sig.answer_probs(image, "is there a red circle"),
                               1 / (1 + np.exp(-logits)), atol=1e-6)

    class Probs(nn.Module):
        def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[0.25, 0.5, 0.25]]).repeat(image.shape[0], 1)

    raw = adapter(module=Probs(), output="probs")
    assert raw.answer_probs(image, "how many shapes").tolist() == [0.25, 0.5, 0.25]


def test_batches_of_any_size_and_padding_independence() -> None:
    model = adapter()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8) for _ in range(5)]
    questions = ["how many shapes", "what color is the shape", "is there a red circle",
                 "shapes", "what is there"]
    batch = model.answer_probs_batch(images, questions)
    single = np.stack([model.answer_probs(i, q) for i, q in zip(images, questions, strict=True)])
    np.testing.assert_allclose(batch, single, atol=1e-7)
    assert model.answer_probs_batch([], []).shape == (0, 3)
    with pytest.raises(InputError, match="2 images but 1 questions"):
        model.answer_probs_batch(images[:2], questions[:1])


def test_mixed_image_sizes_in_one_batch() -> None:
    model = adapter()
    flat_small = np.full((16, 16, 3), 60, dtype=np.uint8)
    flat_large = np.full((33, 20, 3), 60, dtype=np.uint8)
    out = model.answer_probs_batch([flat_small, flat_large], ["shapes", "shapes"])
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_eval_mode_no_autograd_and_flags_restored() -> None:
    seen: list[tuple[bool, bool]] = []

    class Spy(LinearVQANet):
        def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            seen.append((self.training, torch.is_grad_enabled()))
            return super().forward(image, tokens)

    net = Spy()
    net.train()
    adapter(module=net).answer_probs(np.zeros((16, 16, 3), np.uint8), "shapes")
    assert seen == [(False, False)]
    assert net.training is True


def test_forward_failures_and_bad_outputs() -> None:
    class Broken(nn.Module):
        def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("size mismatch in layer 3")

    class Wrong(nn.Module):
        def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            return torch.zeros(image.shape[0], 5)

    class NotTensor(nn.Module):
        def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> object:
            return {"logits": 1}

    class Nan(nn.Module):
        def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            return torch.full((image.shape[0], 3), float("nan"))

    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ModelError, match="forward pass failed: RuntimeError: size mismatch"):
        adapter(module=Broken()).answer_probs(image, "shapes")
    with pytest.raises(ModelOutputError, match=r"shape \(1, 5\), expected \(1, 3\)"):
        adapter(module=Wrong()).answer_probs(image, "shapes")
    with pytest.raises(ModelOutputError, match="returned dict"):
        adapter(module=NotTensor()).answer_probs(image, "shapes")
    with pytest.raises(ModelOutputError, match="NaN"):
        adapter(module=Nan(), output="probs").answer_probs(image, "shapes")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output": "logits"}, "output must be one of softmax, sigmoid, probs"),
        ({"image_size": 0}, "image_size must be a positive int"),
        ({"image_size": (16, 16, 3)}, "image_size must be"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"mean": (0.5, 0.5)}, "mean must be three finite numbers"),
        ({"module": "not a module"}, "module must be a torch.nn.Module, got str"),
    ],
)
def test_constructor_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        adapter(**kwargs)


def test_answers_and_tokenizer_validation() -> None:
    with pytest.raises(InputError, match="answers must be unique"):
        TorchAdapter(LinearVQANet(), ["a", "a", "b"], toy_tokenizer(), image_size=16)
    with pytest.raises(InputError, match="tokenizer must be callable"):
        TorchAdapter(LinearVQANet(), TOY_ANSWERS, None, image_size=16)  # type: ignore[arg-type]


def test_questions_of_unknown_words_only_are_refused() -> None:
    model = adapter()
    assert model.validate_question("  what colour is it? ") == "what colour is it?"
    with pytest.raises(QuestionError, match="none of the words of 'purple zebras' are in"):
        model.validate_question("purple zebras")


def test_pad_tokens() -> None:
    assert pad_tokens([[3, 4], [5], []]).tolist() == [[3, 4], [5, 0], [0, 0]]
    assert pad_tokens([[]]).tolist() == [[0]]
