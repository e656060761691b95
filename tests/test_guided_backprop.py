"""Guided backpropagation and plain gradients: exact toys, Captum, state left untouched, CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from blackbox_vqa.adapters.gradients import has_gradients
from blackbox_vqa.adapters.torch.hooks import embedding_offsets, guided_relu
from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.cli.app import main
from blackbox_vqa.errors import GradientUnavailableError, InputError, ModelError
from blackbox_vqa.explainers.guided_backprop import (
    GuidedBackprop,
    image_saliency,
    word_saliency,
)

from toys import LinearVQANet, brightness_model, toy_tokenizer

# -- models --------------------------------------------------------------------------------


def _relu(kind: str, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if kind in ("module", "module_inplace"):
        return module(x)  # type: ignore[no-any-return]
    if kind == "F.relu":
        return F.relu(x)
    if kind == "torch.relu":
        return torch.relu(x)
    if kind == "relu_":
        return x.relu_()
    return F.relu(x, inplace=True)  # "F.relu_inplace"


class ReluToy(nn.Module):
    """Hand-computable: ``c0 = R - G``, ``c1 = G`` (1x1 conv), ``h = relu(c)``,
    ``score0 = sum(h0) - 2 sum(h1) + sum(word embeddings) + 10``, ``score1 = 10``.

    d score0 / d pixel: plain ``R: [c0>0]``, ``G: -[c0>0] - 2[c1>0]``; guided (negative
    gradients blocked at the ReLU): ``R: [c0>0]``, ``G: -[c0>0]`` (the h1 path is blocked).
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 2, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=kind == "module_inplace")
        self.embedding = nn.Embedding(20, 2, padding_idx=0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 0.0]])[:, :, None,
                                                                                  None])
            self.embedding.weight.copy_(torch.arange(40, dtype=torch.float32).view(20, 2) / 40)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = _relu(self.kind, self.conv(image), self.relu)
        score = h[:, 0].sum((1, 2)) - 2 * h[:, 1].sum((1, 2))
        score = score + self.embedding(tokens).sum((1, 2)) + 10
        return torch.stack([score, torch.full_like(score, 10.0)], dim=1)


def relu_toy_adapter(kind: str = "F.relu") -> TorchAdapter:
    return TorchAdapter(ReluToy(kind), ["yes", "no"], toy_tokenizer(), image_size=2,
                        mean=(0, 0, 0), std=(1, 1, 1), output="probs", device="cpu")


# R, G per pixel (B = 0): c0 = R - G, c1 = G.
TOY_PIXELS = np.array(
    [[[200, 100, 0], [50, 100, 0]], [[100, 0, 0], [80, 80, 0]]], dtype=np.uint8
)


def toy_expected(guided: bool) -> np.ndarray:
    x = TOY_PIXELS.astype(np.float64) / 255.0
    c0 = (x[..., 0] - x[..., 1]) > 0
    c1 = x[..., 1] > 0
    grad = np.zeros((3, 2, 2))
    grad[0] = c0
    grad[1] = -c0.astype(float) - (0.0 if guided else 2.0 * c1)
    return grad


class SmallVQANet(nn.Module):
    """CNN (``nn.ReLU`` modules) + 2-layer LSTM read at the last real token + product + MLP:
    the reference model's family, small. Five answers."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.image_fc = nn.Linear(32, 16)
        self.embedding = nn.Embedding(vocab_size, 8, padding_idx=0)
        self.lstm = nn.LSTM(8, 8, num_layers=2, batch_first=True)
        self.question_fc = nn.Linear(8, 16)
        self.classifier = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.1),
                                        nn.Linear(16, 5))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pictured = torch.tanh(self.image_fc(self.cnn(image).flatten(1)))
        outputs, _ = self.lstm(self.embedding(tokens))
        last = (tokens != 0).sum(dim=1).clamp(min=1) - 1
        index = last.view(-1, 1, 1).expand(-1, 1, outputs.shape[2])
        asked = torch.tanh(self.question_fc(outputs.gather(1, index).squeeze(1)))
        return self.classifier(pictured * asked)  # type: ignore[no-any-return]


def small_vqa_net(seed: int = 0) -> SmallVQANet:
    torch.manual_seed(seed)
    return SmallVQANet(len(toy_tokenizer().vocab) + 2)


def small_vqa(seed: int = 0) -> TorchAdapter:
    """Factory spec ``test_guided_backprop:small_vqa`` (an nn.ReLU CNN + LSTM model)."""
    return TorchAdapter(small_vqa_net(seed), list("abcde"), toy_tokenizer(), image_size=16,
                        device="cpu", name="small-vqa")


def _image(seed: int = 1, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


class _Softmax(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.module(image, tokens), dim=-1)


def _captum(module: nn.Module, adapter: TorchAdapter, image: np.ndarray, question: str,
            target: int) -> np.ndarray:
    from captum.attr import GuidedBackprop as CaptumGuidedBackprop

    x, tokens = adapter.inputs([image], [question])
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr = CaptumGuidedBackprop(module).attribute(
            x.clone().requires_grad_(True), target=target, additional_forward_args=(tokens,)
        )
    return attr[0].detach().numpy()


def _close(ours: np.ndarray, theirs: np.ndarray, tol: float = 1e-5) -> None:
    scale = float(np.abs(theirs).max())
    assert scale > 0
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * scale)


# -- guided ReLU: exact toys -----------------------------------------------------------------

RELU_KINDS = ["module", "module_inplace", "F.relu", "torch.relu", "relu_", "F.relu_inplace"]


@pytest.mark.parametrize("kind", RELU_KINDS)
def test_every_relu_form_is_guided(kind: str) -> None:
    adapter = relu_toy_adapter(kind)
    guided = adapter.input_gradients(TOY_PIXELS, "what color", answer="yes", guided=True)
    plain = adapter.input_gradients(TOY_PIXELS, "what color", answer="yes", guided=False)
    np.testing.assert_allclose(guided.image, toy_expected(guided=True), atol=1e-6)
    np.testing.assert_allclose(plain.image, toy_expected(guided=False), atol=1e-6)
    # Two words; d score0 / d embedding = 1 for every coordinate (no ReLU on that path).
    np.testing.assert_allclose(guided.words, np.ones((2, 2)), atol=1e-6)
    assert guided.answer_index == 0 and guided.guided and not plain.guided


def test_captum_misses_functional_relu_where_we_do_not() -> None:
    from captum.attr import GuidedBackprop as CaptumGuidedBackprop

    adapter = relu_toy_adapter("F.relu")
    x, tokens = adapter.inputs([TOY_PIXELS], ["what color"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = CaptumGuidedBackprop(adapter.module).attribute(
            x.clone().requires_grad_(True), target=0, additional_forward_args=(tokens,)
        )[0].detach().numpy()
    ours = adapter.input_gradients(TOY_PIXELS, "what color", answer=0, guided=True).image
    np.testing.assert_allclose(captum, toy_expected(guided=False), atol=1e-6)  # plain
    np.testing.assert_allclose(ours, toy_expected(guided=True), atol=1e-6)
    assert np.abs(ours - captum).max() > 1.0


def test_guided_equals_captum_on_relu_modules() -> None:
    adapter = small_vqa(seed=3)
    image, question = _image(), "what color is the shape"
    ours = adapter.input_gradients(image, question, guided=True)
    plain = adapter.input_gradients(image, question, guided=False)
    theirs = _captum(_Softmax(adapter.module), adapter, image, question, ours.answer_index)
    _close(ours.image, theirs)
    assert np.abs(plain.image - theirs).max() > 1e-3 * np.abs(theirs).max()


def test_guided_equals_captum_for_another_answer_and_the_traced_graph() -> None:
    adapter = small_vqa(seed=4)
    image, question = _image(seed=5), "is there a red circle"
    ours = adapter.input_gradients(image, question, answer="c", guided=True)
    assert ours.answer_index == 2
    theirs = _captum(_Softmax(adapter.module), adapter, image, question, 2)
    _close(ours.image, theirs)
    x, tokens = adapter.inputs([image], [question])
    traced = torch.jit.trace(_Softmax(adapter.module).eval(), (x, tokens), check_trace=False)
    for _ in range(3):  # past the JIT's profiling runs
        leaf = x.clone().requires_grad_(True)
        # As GraphAdapter does: without JIT optimisation the traced graph's backward is
        # made of ATen ops (autodiff subgraphs would bring their own ReLU formula).
        with torch.jit.optimized_execution(False):
            score = traced(leaf, tokens)[0, 2]
        with guided_relu():
            (grad,) = torch.autograd.grad(score, leaf)
        _close(grad[0].numpy(), theirs)


def test_plain_gradients_match_a_hand_derivation_without_relus() -> None:
    module = LinearVQANet(seed=2)
    adapter = TorchAdapter(module, ["a", "b", "c"], toy_tokenizer(), image_size=4,
                           device="cpu")
    image = _image(seed=7, size=4)
    grads = adapter.input_gradients(image, "how many shapes", guided=False)
    x, tokens = adapter.inputs([image], ["how many shapes"])
    with torch.no_grad():
        probs = torch.softmax(module(x, tokens), -1)[0].double().numpy()
    a = grads.answer_index
    assert a == int(np.argmax(probs))
    dlogits = probs[a] * (np.eye(3)[a] - probs)          # d p_a / d logits
    weight = module.image_weight.detach().double().numpy()
    expected_image = np.broadcast_to((dlogits @ weight)[:, None, None] / 16, (3, 4, 4))
    np.testing.assert_allclose(grads.image, expected_image, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(grads.words, np.tile(dlogits, (3, 1)), rtol=1e-5, atol=1e-9)
    guided = adapter.input_gradients(image, "how many shapes", guided=True)
    np.testing.assert_array_equal(guided.image, grads.image)  # no ReLU: nothing to guide


# -- the explainer -----------------------------------------------------------------------


def test_explainer_maps_are_channel_max_and_word_norms() -> None:
    adapter = small_vqa(seed=1)
    result = GuidedBackprop(adapter).explain(_image(), "what color is the shape")
    grads = adapter.input_gradients(_image(), "what color is the shape", guided=True)
    assert result.mode == "guided"
    assert result.image_size == (16, 16) and result.gradient.shape == (3, 16, 16)
    np.testing.assert_array_equal(result.gradient, grads.image)
    np.testing.assert_allclose(result.image_map, np.abs(grads.image).max(axis=0))
    assert grads.words is not None
    np.testing.assert_allclose(result.word_map, np.sqrt((grads.words.astype(np.float64) ** 2)
                                                        .sum(axis=1)))
    assert result.tokens == ("what", "color", "is", "the", "shape")
    assert result.answer == "abcde"[result.answer_index]
    assert result.predicted_index == result.answer_index
    assert result.probability == pytest.approx(float(result.scores[result.answer_index]))
    plain = GuidedBackprop(adapter, guided=False).explain(_image(), "what color is the shape",
                                                          answer="e")
    assert plain.mode == "plain" and plain.answer == "e" and plain.answer_index == 4


def test_saliency_functions() -> None:
    grad = np.array([[[1.0, -2.0]], [[-3.0, 0.5]], [[0.0, 1.0]]])
    np.testing.assert_array_equal(image_saliency(grad), [[3.0, 2.0]])
    np.testing.assert_allclose(word_saliency(np.array([[3.0, 4.0], [0.0, 0.0]])), [5.0, 0.0])


def test_token_labels_when_tokens_are_not_words() -> None:
    class CharTokenizer:
        def __call__(self, question: str) -> list[int]:
            return [2 + (ord(c) % 10) for c in question.replace(" ", "")][:6]

    module = LinearVQANet()
    adapter = TorchAdapter(module, ["a", "b", "c"], CharTokenizer(), image_size=4,
                           device="cpu")
    result = GuidedBackprop(adapter).explain(_image(size=4), "ab cd")
    assert len(result.tokens) == 4 and all(t.startswith("#") for t in result.tokens)
    assert result.word_map.shape == (4,)


def test_no_embedding_gives_image_gradients_and_a_note() -> None:
    class NoEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            return self.linear(image.mean((2, 3))) + tokens.float().mean(1, keepdim=True)

    adapter = TorchAdapter(NoEmbedding(), ["a", "b"], toy_tokenizer(), image_size=4,
                           device="cpu")
    result = GuidedBackprop(adapter).explain(_image(size=4), "how many shapes")
    assert result.word_map.size == 0 and "nn.Embedding" in result.words_note
    assert np.abs(result.gradient).max() > 0


def test_models_without_gradients_are_refused() -> None:
    model = brightness_model()
    assert not has_gradients(model)
    with pytest.raises(GradientUnavailableError, match="bbvqa export"):
        GuidedBackprop(model)


def test_bad_answers_are_refused() -> None:
    adapter = small_vqa()
    with pytest.raises(InputError, match="not one of the model's answers"):
        adapter.input_gradients(_image(), "what color", answer="zebra")
    with pytest.raises(InputError, match=r"answer index must be in \[0, 5\)"):
        adapter.input_gradients(_image(), "what color", answer=7)


# -- the user's module and torch's state are left as they were -------------------------------


class _Explode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backward exploded")


class ExplodingNet(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.inner = small_vqa_net(seed=2)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.where == "forward":
            raise RuntimeError("forward exploded")
        if self.where == "embedding twice":
            self.inner.embedding(tokens)
        return _Explode.apply(self.inner(image, tokens))  # type: ignore[no-any-return]


def _snapshot(module: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "training": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                  for m in module.modules()],
    }


def _assert_same(before: dict[str, Any], module: nn.Module) -> None:
    after = _snapshot(module)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"] and not any(after["hooks"])
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize(
    ("where", "message"),
    [("backward", "backward exploded"), ("forward", "forward exploded"),
     ("embedding twice", "more than once")],
)
@pytest.mark.parametrize("guided", [True, False])
def test_module_and_torch_state_untouched_after_errors(where: str, message: str,
                                                       guided: bool) -> None:
    module = ExplodingNet(where)
    module.train()  # the adapter must restore training flags, not leave eval mode
    module.inner.lstm.eval()
    adapter = TorchAdapter(module, list("abcde"), toy_tokenizer(), image_size=16,
                           device="cpu")
    before = _snapshot(module)
    grad_mode = torch.is_grad_enabled()
    with pytest.raises(ModelError, match=message):
        adapter.input_gradients(_image(), "what color is the shape", guided=guided)
    _assert_same(before, module)
    assert torch.is_grad_enabled() == grad_mode
    assert torch._C._len_torch_dispatch_stack() == 0
    # Nothing guided is left behind: a plain backward through a ReLU is plain again.
    x = torch.tensor([1.0, -1.0], requires_grad=True)
    (grad,) = torch.autograd.grad((torch.relu(x) * -3.0).sum(), x)
    assert grad.tolist() == [-3.0, 0.0]


def test_module_untouched_after_success() -> None:
    adapter = small_vqa(seed=6)
    adapter.module.train()
    before = _snapshot(adapter.module)
    adapter.input_gradients(_image(), "what color is the shape", guided=True)
    _assert_same(before, adapter.module)
    assert torch._C._len_torch_dispatch_stack() == 0


def test_embedding_offsets_hook_is_removed_when_the_block_raises() -> None:
    embedding = nn.Embedding(5, 2)
    with pytest.raises(ValueError, match="inside"), \
            embedding_offsets(embedding, torch.zeros(1, 3, 2)):
        assert len(embedding._forward_hooks) == 1
        raise ValueError("inside")
    assert len(embedding._forward_hooks) == 0


def test_guided_mode_is_popped_when_backward_raises() -> None:
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="backward exploded"), guided_relu():
        torch.autograd.grad(_Explode.apply(torch.relu(x)).sum(), x)
    assert torch._C._len_torch_dispatch_stack() == 0


# -- CLI -------------------------------------------------------------------------------------


def run(args: list[str]) -> int:
    """``bbvqa ARGS`` in this process; its exit code."""
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "input.png"
    Image.fromarray(_image(seed=11, size=20)).save(path)
    return path


def test_cli_guided_bp_writes_section_arrays_and_figures(png: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) \
        -> None:
    out = tmp_path / "out"
    assert run(["explain", "--image", str(png), "-q", "what color is the shape?", "--model",
                "test_guided_backprop:small_vqa", "--method", "guided-bp", "--out",
                str(out)]) == 0
    doc = json.loads((out / "explanation.json").read_text())
    expected = GuidedBackprop(small_vqa()).explain(np.asarray(Image.open(png)),
                                                   "what color is the shape?")
    section = doc["guided_backprop"]
    assert doc["occlusion"] is None and doc["answer"] == expected.answer
    assert section["mode"] == "guided" and section["source"] == "model"
    assert section["image_size"] == [16, 16] and section["gradient_shape"] == [3, 16, 16]
    np.testing.assert_allclose(section["image"], expected.image_map, rtol=1e-6)
    np.testing.assert_allclose(section["words"], expected.word_map, rtol=1e-6)
    assert section["tokens"] == ["what", "color", "is", "the", "shape"]
    raw = np.load(out / "guided_backprop.npy")
    assert raw.dtype == np.float32 and raw.shape == (3, 16, 16)
    np.testing.assert_array_equal(raw, expected.gradient)
    for name in ("guided_backprop.png", "guided_backprop_words.png"):
        assert Image.open(out / name).size[0] > 100
    assert not list(out.glob(".*.tmp"))
    assert "words by gradient norm" in capsys.readouterr().out


def test_cli_method_all_runs_every_method(png: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    assert run(["explain", "--image", str(png), "-q", "is there a red circle", "--model",
                "test_guided_backprop:small_vqa", "--method", "all", "--answer", "b", "--out",
                str(out), "--grid", "4"]) == 0
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["answer"] == "b"
    assert doc["guided_backprop"]["answer"] == "b" and doc["gradient"]["answer"] == "b"
    assert doc["gradient"]["mode"] == "plain"
    assert doc["guided_backprop"]["image"] != doc["gradient"]["image"]
    assert len(doc["occlusion"]["image"]) == 4
    for name in ("occlusion.png", "guided_backprop.npy", "gradient.npy", "gradient.png"):
        assert (out / name).is_file()


def test_cli_guided_bp_on_a_model_without_gradients_exits_2(
    png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["explain", "--image", str(png), "-q", "is it bright", "--model",
              "toys:brightness_model", "--method", "gradient", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a PyTorch graph" in err and "bbvqa export" in err
    assert not (tmp_path / "x").exists()


def test_cli_guided_bp_on_an_http_model_exits_2(png: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from blackbox_vqa.server.app import create_app
    from live_server import uvicorn_server

    with uvicorn_server(create_app(small_vqa())) as url:
        with pytest.raises(SystemExit) as info:
            main(["explain", "--image", str(png), "-q", "what color", "--model", url,
                  "--method", "guided-bp", "--out", str(tmp_path / "h")])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "HTTP endpoint" in err and "bbvqa export" in err
        assert run(["explain", "--image", str(png), "-q", "what color", "--model", url,
                    "--method", "all", "--grid", "2", "--out", str(tmp_path / "h2")]) == 0
    doc = json.loads((tmp_path / "h2" / "explanation.json").read_text())
    assert doc["guided_backprop"]["available"] is False
    assert "HTTP endpoint" in doc["guided_backprop"]["reason"]
    assert len(doc["occlusion"]["image"]) == 2


def test_cli_bad_method_exits_2(png: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["explain", "--image", str(png), "-q", "what", "--method", "saliency"])
    assert info.value.code == 2
    assert "saliency" in capsys.readouterr().err
