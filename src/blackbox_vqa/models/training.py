"""Training and evaluation of the reference model on the easy-VQA data set.

The data come from the ``easy-vqa`` package (4000 train images with 38575 questions,
1000 test images with 9673 questions, 13 answers, 64 x 64 RGB PNGs). Images are read
once into memory as ``uint8``; each training step takes a batch of questions drawn at
random, each with its own image. (Batches of a few images with all their questions
were tried first: cheaper per step, but the correlated batches left the image path
barely trained: 85% test accuracy after 4 epochs, against 100% after 3 this way.)

By default 80% of the training images get 1-3 distractor squares (4-6 px, half in the
occlusion baseline's grey, half in random colours) on their background, and the loss
uses label smoothing 0.1. Without them the model was saturated (p = 0.9995) and took a
grey occlusion patch on the flat background for a new shape, so grey-fill occlusion maps
were at chance against the shape (rank correlation 0.002 on 300 test items); with them
that correlation is 0.52 at 100% test accuracy (docs/models/easyvqa.md).

Everything random is drawn from the seed: weight initialisation and dropout
(``torch.manual_seed``), question order and flips (a NumPy generator), distractors (a
second NumPy generator seeded with ``[seed, 1]``). Training uses
deterministic torch algorithms, so the same seed, thread count and torch build give the
same weights.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError
from blackbox_vqa.models.easyvqa_net import EasyVQANet, NetConfig
from blackbox_vqa.models.reference import METADATA_FILE, WEIGHTS_FILE
from blackbox_vqa.text import PAD_ID, WordTokenizer

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_SEED",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "METADATA_FILE",
    "SCHEMA",
    "WEIGHTS_FILE",
    "EasyVQASplit",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "add_distractors",
    "background_masks",
    "evaluate",
    "load_split",
    "normalise",
    "pad_questions",
    "save_weights",
    "train_reference_model",
]

Split = Literal["train", "test"]

DEFAULT_SEED = 0
DEFAULT_EPOCHS = 6
DEFAULT_DISTRACTORS = 0.8
DEFAULT_LABEL_SMOOTHING = 0.1
# Distractor squares: side in pixels (one 16 x 16 grid cell of a 64 x 64 image is 4),
# how many per image, and the occlusion baseline colour (ImageNet mean RGB) half of
# them are filled with; the other half get a uniform random colour.
DISTRACTOR_SIDES = (4, 6)
DISTRACTOR_COUNT = 3
DISTRACTOR_GREY = (124, 117, 104)
IMAGE_SIZE = 64
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)
SCHEMA = "blackbox_vqa.reference_model/1"


@dataclass(frozen=True)
class EasyVQASplit:
    """One split held in memory.

    Attributes:
        images: ``uint8 [N, 64, 64, 3]`` RGB images.
        questions: the ``Q`` question strings.
        answers: ``int64 [Q]`` answer indices into the answer list.
        image_index: ``int64 [Q]`` row of ``images`` each question is about.
        image_ids: easy-VQA image id of each row of ``images``.
    """

    images: NDArray[np.uint8]
    questions: list[str]
    answers: NDArray[np.int64]
    image_index: NDArray[np.int64]
    image_ids: list[int]

    def __len__(self) -> int:
        return len(self.questions)


def _read_png(path: str) -> NDArray[np.uint8]:
    from blackbox_vqa.images import load_image

    image = load_image(path)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise InputError(f"easy-VQA image {path} has shape {image.shape}, expected 64x64x3")
    return image


def load_split(
    split: Split,
    answers: Sequence[str],
    *,
    limit: int | None = None,
    indices: Sequence[int] | None = None,
) -> EasyVQASplit:
    """Read a split of easy-VQA: the first ``limit`` questions, those at ``indices``, or all.

    Only the images those questions are about are read.
    """
    import easy_vqa

    if split == "train":
        texts, labels, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, labels, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of questions, got {limit}")
    chosen = list(indices) if indices is not None else list(range(len(texts)))[:limit]
    answer_index = {a: i for i, a in enumerate(answers)}
    rows: dict[int, int] = {}
    image_index = []
    for q in chosen:
        image_index.append(rows.setdefault(int(ids[q]), len(rows)))
    images = np.stack([_read_png(paths[image_id]) for image_id in rows])
    return EasyVQASplit(
        images=images,
        questions=[texts[q] for q in chosen],
        answers=np.array([answer_index[labels[q]] for q in chosen], dtype=np.int64),
        image_index=np.array(image_index, dtype=np.int64),
        image_ids=list(rows),
    )


def normalise(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> ``float32 [B, 3, H, W]``, ``(x / 255 - mean) / std``.

    Computed as the adapters compute it (``x * 1/(255 std) - mean/std``), so training,
    evaluation and the adapters see the same numbers.
    """
    batch = images.permute(0, 3, 1, 2).float()
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
    offset = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1)
    return (batch * scale + offset).contiguous()


def pad_questions(tokenizer: WordTokenizer, questions: Sequence[str]) -> torch.Tensor:
    """Token ids right-padded with ``0``: ``int64 [Q, max(1, longest)]``."""
    ids = [tokenizer(q) for q in questions]
    out = torch.full((len(ids), max([1, *map(len, ids)])), PAD_ID, dtype=torch.int64)
    for row, tokens in enumerate(ids):
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`train_reference_model`.

    ``limit`` keeps the first ``limit`` train and test questions; ``steps`` stops after
    that many optimiser steps (both for smoke tests). ``threads`` sets torch's CPU
    threads for the run (restored after).
    """

    epochs: int = DEFAULT_EPOCHS
    seed: int = DEFAULT_SEED
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    flip: bool = False
    distractors: float = DEFAULT_DISTRACTORS
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING
    limit: int | None = None
    steps: int | None = None
    threads: int | None = None
    net: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        for name in ("limit", "steps", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive int or None, got {value!r}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.distractors <= 1.0:
            raise InputError(f"distractors must be in [0, 1], got {self.distractors!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")


@dataclass(frozen=True)
class StepInfo:
    """Progress after one optimiser step; ``epoch_loss``/``epoch_accuracy`` at epoch ends."""

    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float
    epoch_done: bool = False
    epoch_loss: float | None = None
    epoch_accuracy: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """A trained model and what it took to get it."""

    model: EasyVQANet
    tokenizer: WordTokenizer
    answers: list[str]
    config: TrainConfig
    test_accuracy: float
    test_items: int
    train_items: int
    epoch_losses: list[float]
    step_losses: list[float]
    steps: int
    seconds: float
    threads: int


def _seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def background_masks(images: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """``bool [N, H, W]``: True on the background of each easy-VQA image (not the shape)."""
    from blackbox_vqa.datasets.easyvqa import shape_map

    return np.stack([shape_map(image) == 0.0 for image in images])


def add_distractors(
    images: NDArray[np.uint8],
    background: NDArray[np.bool_],
    rng: np.random.Generator,
    probability: float,
) -> NDArray[np.uint8]:
    """Copies of ``uint8 [B, H, W, 3]`` images, some with small squares on the background.

    Each image, with ``probability``, gets 1 to ``DISTRACTOR_COUNT`` squares of side
    ``DISTRACTOR_SIDES[0]..[1]`` pixels, each placed (up to 10 tries) where it and a
    1-pixel margin lie on the background (``background``, ``bool [B, H, W]``), so the
    shape and the answer stay unchanged. Half the squares are the occlusion baseline's
    grey, half a uniform random colour: the model learns that a square of filled
    background is not a shape, so occlusion maps stop lighting up the background.
    """
    out = images.copy()
    height, width = images.shape[1:3]
    low, high = DISTRACTOR_SIDES
    for row in np.flatnonzero(rng.random(len(images)) < probability):
        for _ in range(int(rng.integers(1, DISTRACTOR_COUNT + 1))):
            side = int(rng.integers(low, high + 1))
            grey = bool(rng.random() < 0.5)
            colour = DISTRACTOR_GREY if grey else tuple(int(v) for v in rng.integers(0, 256, 3))
            for _ in range(10):
                top = int(rng.integers(0, height - side + 1))
                left = int(rng.integers(0, width - side + 1))
                region = background[row, max(0, top - 1) : top + side + 1,
                                    max(0, left - 1) : left + side + 1]
                if region.all():
                    out[row, top : top + side, left : left + side] = colour
                    break
    return out


def _train_step(
    model: EasyVQANet,
    optimiser: torch.optim.Optimizer,
    split: EasyVQASplit,
    tokens: torch.Tensor,
    questions: NDArray[np.int64],
    flips: NDArray[np.bool_],
    config: TrainConfig,
    background: NDArray[np.bool_] | None,
    distractor_rng: np.random.Generator,
) -> tuple[float, int, int]:
    rows = split.image_index[questions]
    pixels = split.images[rows]
    if background is not None and config.distractors > 0:
        pixels = add_distractors(pixels, background[rows], distractor_rng, config.distractors)
    images = torch.from_numpy(pixels)
    if flips.any():
        flip_rows = torch.from_numpy(np.flatnonzero(flips))
        images[flip_rows] = images[flip_rows].flip(2)
    q_tokens = tokens[torch.from_numpy(questions)]
    q_tokens = q_tokens[:, : max(1, int((q_tokens != PAD_ID).sum(1).max()))]
    target = torch.from_numpy(split.answers[questions])
    logits = model(normalise(images), q_tokens)
    loss = F.cross_entropy(logits, target, label_smoothing=config.label_smoothing)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    optimiser.step()
    correct = int((logits.argmax(1) == target).sum())
    return loss.item(), correct, len(questions)


@torch.no_grad()
def evaluate(
    model: EasyVQANet, tokenizer: WordTokenizer, split: EasyVQASplit, *, batch_size: int = 256
) -> float:
    """Accuracy of ``model`` (in eval mode) on every question of ``split``."""
    was_training = model.training
    model.eval()
    try:
        image_emb = torch.cat(
            [
                model.embed_image(normalise(torch.from_numpy(split.images[i : i + batch_size])))
                for i in range(0, len(split.images), batch_size)
            ]
        )
        tokens = pad_questions(tokenizer, split.questions)
        index = torch.from_numpy(split.image_index)
        answers = torch.from_numpy(split.answers)
        correct = 0
        for i in range(0, len(split), batch_size):
            part = slice(i, i + batch_size)
            logits = model.classify(image_emb[index[part]], model.embed_question(tokens[part]))
            correct += int((logits.argmax(1) == answers[part]).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(split))


def train_reference_model(
    config: TrainConfig | None = None,
    *,
    progress: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train the reference model on easy-VQA train and report its test accuracy."""
    import easy_vqa

    config = config or TrainConfig()
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        torch.use_deterministic_algorithms(True)
        return _train(config, list(easy_vqa.get_answers()), progress)
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_deterministic)


def _train(
    config: TrainConfig, answers: list[str], progress: Callable[[StepInfo], None] | None
) -> TrainResult:
    start = time.perf_counter()
    train = load_split("train", answers, limit=config.limit)
    test = load_split("test", answers, limit=config.limit)
    tokenizer = WordTokenizer.build(train.questions)
    rng = _seed_everything(config.seed)
    distractor_rng = np.random.default_rng([config.seed, 1])
    background = background_masks(train.images) if config.distractors > 0 else None
    net_config = NetConfig.from_dict(
        {"vocab_size": len(tokenizer.vocab) + 2, "num_answers": len(answers), **config.net}
    )
    model = EasyVQANet(net_config)
    tokens = pad_questions(tokenizer, train.questions)
    n_questions = len(train)
    if n_questions < 2:
        raise InputError(f"training needs at least 2 questions; got {n_questions}: raise the limit")
    # The last batch takes the remainder, so no batch is tiny.
    per_epoch = max(1, n_questions // config.batch_size)
    total = per_epoch * config.epochs
    if config.steps is not None:
        total = min(total, config.steps)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, total) / max(total, 1)))
    )
    model.train()
    step_losses: list[float] = []
    epoch_losses: list[float] = []
    step = 0
    for epoch in range(config.epochs):
        order = rng.permutation(n_questions)
        flips = rng.random(n_questions) < 0.5 if config.flip else np.zeros(n_questions, bool)
        seen = correct = 0
        loss_sum = 0.0
        for b in range(per_epoch):
            if step >= total:
                break
            end = (b + 1) * config.batch_size if b < per_epoch - 1 else n_questions
            batch = slice(b * config.batch_size, end)
            loss, right, count = _train_step(
                model, optimiser, train, tokens, order[batch], flips[batch],
                config, background, distractor_rng,
            )
            schedule.step()
            step += 1
            step_losses.append(loss)
            loss_sum += loss * count
            seen += count
            correct += right
            last = b == per_epoch - 1 or step >= total
            if last:
                epoch_losses.append(loss_sum / max(1, seen))
            if progress is not None:
                progress(StepInfo(
                    step=step, total_steps=total, epoch=epoch + 1, epochs=config.epochs,
                    loss=loss, epoch_done=last,
                    epoch_loss=epoch_losses[-1] if last else None,
                    epoch_accuracy=correct / max(1, seen) if last else None,
                ))
        if step >= total:
            break
    model.eval()
    accuracy = evaluate(model, tokenizer, test)
    return TrainResult(
        model=model, tokenizer=tokenizer, answers=answers, config=config,
        test_accuracy=accuracy, test_items=len(test), train_items=len(train),
        epoch_losses=epoch_losses, step_losses=step_losses, steps=step,
        seconds=time.perf_counter() - start, threads=torch.get_num_threads(),
    )


def metadata(result: TrainResult) -> dict[str, Any]:
    """The JSON description written beside the weights."""
    cfg = result.config
    return {
        "schema": SCHEMA,
        "name": "easyvqa",
        "weights": WEIGHTS_FILE,
        "answers": list(result.answers),
        "tokenizer": result.tokenizer.to_dict(),
        "architecture": result.model.config.to_dict(),
        "preprocessing": {
            "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            "mean": list(IMAGE_MEAN),
            "std": list(IMAGE_STD),
            "output": "softmax",
        },
        "training": {
            "data": "easy-vqa train split",
            "train_items": result.train_items,
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "steps": result.steps,
            "batch_size": cfg.batch_size,
            "optimizer": "Adam",
            "lr": cfg.lr,
            "schedule": "cosine",
            "weight_decay": cfg.weight_decay,
            "horizontal_flip": cfg.flip,
            "distractors": cfg.distractors,
            "label_smoothing": cfg.label_smoothing,
            "limit": cfg.limit,
            "threads": result.threads,
            "seconds": round(result.seconds, 1),
            "torch": torch.__version__,
            "final_train_loss": result.epoch_losses[-1] if result.epoch_losses else None,
        },
        "evaluation": {
            "split": "easy-vqa test",
            "items": result.test_items,
            "accuracy": result.test_accuracy,
        },
    }


def save_weights(result: TrainResult, directory: Path, *, overwrite: bool = False) -> Path:
    """Write ``easyvqa.pt`` (state dict) and ``easyvqa.json`` into ``directory``.

    Each file is written atomically. Refuses (:class:`InputError`) to replace existing
    files unless ``overwrite``. Returns the path of the weights file.
    """
    from blackbox_vqa.outputs import atomic_write, atomic_write_json

    directory = Path(directory)
    targets = [directory / WEIGHTS_FILE, directory / METADATA_FILE]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise InputError(f"refusing to overwrite {', '.join(existing)} (pass overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
    atomic_write(targets[0], lambda handle: torch.save(state, handle))
    atomic_write_json(targets[1], metadata(result))
    return targets[0]
