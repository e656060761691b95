"""Models the benchmarks run, each behind a
:class:`~blackbox_vqa.adapters.torch.module.TorchAdapter`.

Two cases, built by name with :func:`build_model`:

- ``"reference"``: the shipped easy-VQA reference model (64 x 64 input) with one easy-VQA
  test image and question. Until its weights exist, a randomly initialised
  :class:`~blackbox_vqa.models.easyvqa_net.EasyVQANet` of the default size stands in
  (``BenchModel.trained`` says which one ran).
- ``"resnet18"``: :class:`ResNetVQA`, a ResNet-18-sized CNN (BasicBlocks 2-2-2-2, 64-512
  channels, ~11.2 M CNN parameters, every ReLU an ``nn.ReLU`` module) and a 2-layer LSTM
  question encoder, point-wise product, MLP over 1000 answers; random weights from a seed,
  224 x 224 input, ImageNet normalisation, with a synthetic 224 x 224 image.

Use from another benchmark script in this folder::

    from models import build_model
    case = build_model("resnet18")
    case.adapter.answer_probs(case.image, case.question)

``case.adapter.module`` is the ``nn.Module`` (``forward(image [B,3,H,W], tokens [B,T]) ->
logits [B,A]``) for exporters and for timing the bare forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.errors import InputError, ModelLoadError
from blackbox_vqa.text import WordTokenizer

__all__ = [
    "MODEL_NAMES",
    "BenchModel",
    "ResNetVQA",
    "build_model",
    "reference_bench_model",
    "resnet_bench_model",
    "resnet_vqa_adapter",
    "synthetic_image",
]

RESNET_QUESTION = "What color is the umbrella that the woman on the left is holding?"
_RESNET_VOCAB_TEXT = (
    "what color is the umbrella that woman on left holding how many people are there "
    "in picture does this man have a hat where cat sitting which side of bus kind dog"
)


@dataclass(frozen=True)
class BenchModel:
    """One benchmark case: an adapter and the input it is explained on.

    Attributes:
        name: ``"reference"`` or ``"resnet18"``.
        adapter: the model behind a ``TorchAdapter`` (``adapter.module`` is the network).
        image: ``uint8`` RGB ``H x W x 3`` at the adapter's input size.
        question: the question asked.
        trained: whether the weights are trained (the reference model's shipped ones).
        description: one line for reports.
    """

    name: str
    adapter: TorchAdapter
    image: NDArray[np.uint8]
    question: str
    trained: bool
    description: str


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm, identity or 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))  # type: ignore[no-any-return]


class ResNetVQA(nn.Module):
    """ResNet-18-sized CNN + 2-layer LSTM + point-wise product + MLP over answers.

    ``forward(image, tokens)``: ``float32 [B, 3, H, W]`` normalised images (any size; 224 in
    the benchmarks) and ``int64 [B, T]`` right-padded token ids (``0`` = padding) ->
    logits ``[B, num_answers]``. The question is read at its last real token, so
    trailing padding changes nothing; every item is independent of its batch.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 1000,
        num_answers: int = 1000,
        word_dim: int = 300,
        lstm_hidden: int = 512,
        joint_dim: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        in_ch = 64
        for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(in_ch, out_ch, stride), _BasicBlock(out_ch, out_ch, 1)]
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.image_fc = nn.Linear(512, joint_dim)
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.lstm = nn.LSTM(word_dim, lstm_hidden, num_layers=2, batch_first=True)
        self.question_fc = nn.Linear(lstm_hidden, joint_dim)
        self.classifier = nn.Sequential(
            nn.Linear(joint_dim, 1000), nn.ReLU(), nn.Linear(1000, num_answers)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            if isinstance(block, _BasicBlock):  # residual branches start small, as is usual
                nn.init.constant_(block.bn2.weight, 0.2)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images and ``[B, T]`` tokens -> logits ``[B, A]``."""
        features = self.pool(self.blocks(self.stem(image))).flatten(1)
        image_embedding = torch.tanh(self.image_fc(features))
        outputs, _ = self.lstm(self.embedding(tokens))
        lengths = (tokens != 0).sum(dim=1).clamp(min=1)
        index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, outputs.shape[2])
        last = outputs.gather(1, index).squeeze(1)
        question_embedding = torch.tanh(self.question_fc(last))
        return self.classifier(image_embedding * question_embedding)  # type: ignore[no-any-return]


def synthetic_image(size: int = 224, *, seed: int = 0) -> NDArray[np.uint8]:
    """A deterministic ``uint8`` ``size x size x 3`` image: smooth colour ramps, a few
    filled rectangles and discs, light noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    image = np.stack([200 * xx + 30, 160 * yy + 40, 120 * (1 - xx) + 60], axis=-1)
    for _ in range(4):
        top, left = rng.integers(0, size * 3 // 4, size=2)
        extent = rng.integers(size // 8, size // 3, size=2)
        image[top : top + extent[0], left : left + extent[1]] = rng.integers(0, 256, size=3)
        cy, cx = rng.uniform(0, 1, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(0.005, 0.02)
        image[disc] = rng.integers(0, 256, size=3)
    image += rng.normal(0.0, 6.0, size=image.shape)
    return np.asarray(np.clip(image, 0, 255), dtype=np.uint8)


def resnet_vqa_adapter(
    *, image_size: int = 224, num_answers: int = 1000, seed: int = 0
) -> TorchAdapter:
    """:class:`ResNetVQA` with random weights from ``seed`` behind a ``TorchAdapter``
    (ImageNet mean/std, softmax, CPU); answers are ``"answer0"``, ``"answer1"``, ...."""
    tokenizer = WordTokenizer.build([_RESNET_VOCAB_TEXT])
    module = ResNetVQA(num_answers=num_answers, seed=seed).eval()
    answers = [f"answer{i}" for i in range(num_answers)]
    return TorchAdapter(
        module, answers, tokenizer, image_size=image_size, device="cpu", name="resnet18-vqa"
    )


def resnet_bench_model(*, seed: int = 0) -> BenchModel:
    """The ``"resnet18"`` case: :func:`resnet_vqa_adapter` on :func:`synthetic_image`."""
    adapter = resnet_vqa_adapter(seed=seed)
    n_params = sum(p.numel() for p in adapter.module.parameters())
    return BenchModel(
        name="resnet18",
        adapter=adapter,
        image=synthetic_image(224, seed=seed),
        question=RESNET_QUESTION,
        trained=False,
        description=(
            f"ResNet-18-sized CNN + 2-layer LSTM VQA net, random weights (seed {seed}), "
            f"224x224, {n_params / 1e6:.1f} M parameters"
        ),
    )


def _easyvqa_example() -> tuple[NDArray[np.uint8], str]:
    """The first easy-VQA test image (64 x 64) and its first question."""
    import easy_vqa

    from blackbox_vqa.images import load_image

    questions, _answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return load_image(paths[image_ids[0]]), str(questions[0])


def _standin_reference_adapter(seed: int) -> TorchAdapter:
    """A randomly initialised default-size ``EasyVQANet`` with the easy-VQA vocabulary."""
    import easy_vqa

    from blackbox_vqa.models.easyvqa_net import EasyVQANet, NetConfig

    tokenizer = WordTokenizer.build(easy_vqa.get_train_questions()[0])
    answers = [str(a) for a in easy_vqa.get_answers()]
    torch.manual_seed(seed)
    config = NetConfig(vocab_size=len(tokenizer.vocab) + 2, num_answers=len(answers))
    module = EasyVQANet(config).eval()
    return TorchAdapter(
        module, answers, tokenizer, image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        device="cpu", name="easyvqa-standin",
    )


def reference_bench_model(*, allow_standin: bool = True, seed: int = 0) -> BenchModel:
    """The ``"reference"`` case: the shipped reference model on an easy-VQA test image.

    Without shipped weights, a random stand-in of the same architecture is used when
    ``allow_standin``; otherwise :class:`ModelLoadError` propagates.
    """
    from blackbox_vqa.models.reference import reference_adapter

    image, question = _easyvqa_example()
    try:
        adapter = reference_adapter()
        trained = True
    except ModelLoadError:
        if not allow_standin:
            raise
        adapter = _standin_reference_adapter(seed)
        trained = False
    n_params = sum(p.numel() for p in adapter.module.parameters())
    state = "shipped trained weights" if trained else f"RANDOM stand-in weights (seed {seed})"
    return BenchModel(
        name="reference",
        adapter=adapter,
        image=image,
        question=question,
        trained=trained,
        description=(
            f"reference easy-VQA CNN + 2-layer LSTM, {state}, "
            f"{adapter.preprocessing.image_size[0]}x{adapter.preprocessing.image_size[1]}, "
            f"{n_params / 1e6:.2f} M parameters"
        ),
    )


_BUILDERS: dict[str, Callable[[], BenchModel]] = {
    "reference": reference_bench_model,
    "resnet18": resnet_bench_model,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str) -> BenchModel:
    """Build the benchmark case ``name`` (one of :data:`MODEL_NAMES`)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise InputError(
            f"unknown benchmark model {name!r}; choose from {', '.join(MODEL_NAMES)}"
        ) from None
    return builder()
