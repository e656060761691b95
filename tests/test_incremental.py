"""Exact incremental occlusion (issue 14): the engine against the plain forward pass."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blackbox_vqa.adapters.incremental import IncrementalScoring, parse_incremental
from blackbox_vqa.adapters.torch.incremental.boxes import (
    WindowSpec,
    changed_boxes,
    output_range,
    source_index,
)
from blackbox_vqa.adapters.torch.incremental.engine import (
    _PASTE_GROUPS,
    IncrementalEngine,
    _Patched,
)
from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.errors import InputError, ModelError
from blackbox_vqa.explainers.occlusion import Occlusion

from toys import TOY_ANSWERS, BrightnessModel, toy_tokenizer

QUESTION = "what color is the shape"


# -- pure box arithmetic ---------------------------------------------------------------


@pytest.mark.parametrize("offsets", [1, 4, _PASTE_GROUPS + 8])
def test_crop_equals_slicing_the_dense_map(offsets: int) -> None:
    """Windows read from a patched map (one, a few or many distinct offsets of the window
    in its patch: slice copies per offset, or the masked gather) equal the same windows
    sliced from the dense map with its padding; bit for bit."""
    gen = torch.Generator().manual_seed(offsets)
    count, channels, size, ph, pw, rows, cols = 40, 3, 12, 4, 5, 7, 6
    base = torch.randn(1, channels, size, size, generator=gen)
    patch = torch.randn(count, channels, ph, pw, generator=gen)
    top = torch.randint(0, size - ph + 1, (count,), generator=gen)
    left = torch.randint(0, size - pw + 1, (count,), generator=gen)
    # window starts relative to each patch: ``offsets`` distinct pairs, some past the map
    pairs = [(-1 - i % 4, -2 + i // 4 % 5) for i in range(offsets)]
    pick = torch.arange(count) % offsets
    row0 = top + torch.tensor([pairs[i][0] for i in pick.tolist()])
    col0 = left + torch.tensor([pairs[i][1] for i in pick.tolist()])
    value = _Patched(base, patch, top, left)
    got = value.crop(row0, rows, col0, cols, -7.0)
    dense = F.pad(value.full(), (size, size, size, size), value=-7.0)
    for n in range(count):
        r, c = int(row0[n]) + size, int(col0[n]) + size
        assert torch.equal(got[n], dense[n, :, r : r + rows, c : c + cols])


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "padding"),
    [(3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 1, 3), (3, 1, 2, 2), (1, 2, 1, 0), (2, 2, 1, 0),
     (5, 3, 2, 4)],
)
def test_output_range_covers_every_changed_output(
    kernel: int, stride: int, dilation: int, padding: int, mode: str
) -> None:
    """Brute force: every output a change in ``[start, stop)`` can reach is in the range."""
    size = 23
    spec = WindowSpec(kernel, stride, dilation, padding, mode)
    weight = torch.ones(1, 1, kernel)
    out_size = (size + 2 * padding - spec.reach) // stride + 1
    for start, length in itertools.product(range(size), (1, 2, 5)):
        stop = min(size, start + length)
        x = torch.zeros(1, 1, size)
        x[0, 0, start:stop] = 1.0
        padded = F.pad(x, (padding, padding), mode=mode)
        y = F.conv1d(padded, weight, stride=stride, dilation=dilation)[0, 0]
        assert len(y) == out_size
        first, n = output_range(torch.tensor([start]), torch.tensor([stop]), spec, out_size,
                                size)
        touched = torch.nonzero(y).flatten()
        assert int(first) >= 0 and int(first) + n <= out_size
        if len(touched):
            assert int(first) <= int(touched.min()) and int(touched.max()) < int(first) + n


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
def test_source_index_matches_padding(mode: str) -> None:
    size, padding = 9, 3
    spec = WindowSpec(3, 2, 1, padding, mode)
    x = torch.arange(size, dtype=torch.float32).view(1, 1, size) + 1.0
    padded = F.pad(x, (padding, padding), mode=mode)[0, 0]
    out_size = (size + 2 * padding - spec.reach) // spec.stride + 1
    starts = torch.arange(out_size)
    index = source_index(starts, 1, spec, size)
    for o, row in zip(starts.tolist(), index, strict=True):
        expected = padded[o * spec.stride : o * spec.stride + spec.reach]
        got = torch.where(row < 0, torch.zeros(()), x[0, 0, row.clamp(min=0)])
        assert torch.equal(got, expected)


def test_changed_boxes_are_computed_from_the_tensors() -> None:
    original = torch.zeros(1, 2, 8, 10)
    batch = original.repeat(3, 1, 1, 1)
    batch[0, 1, 2:5, 3:4] = 1.0
    batch[1, 0, 7, 0] = -1.0
    top, bottom, left, right = changed_boxes(original, batch)
    assert top.tolist() == [2, 7, 0] and bottom.tolist() == [5, 8, 1]
    assert left.tolist() == [3, 0, 0] and right.tolist() == [4, 1, 1]


# -- toy models --------------------------------------------------------------------------


class Residual(nn.Module):
    """Basic residual block (two 3x3 convolutions with batch norm, 1x1 strided shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Identity() if stride == 1 and cin == cout
                      else nn.Conv2d(cin, cout, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


class Inception(nn.Module):
    """Three branches of different reach concatenated along channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(cin, 4, 1)
        self.b = nn.Conv2d(cin, 4, 5, padding=2)
        self.c = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(cin, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), F.relu(self.b(x)), self.c(x)], dim=1)


def _features(kind: str) -> nn.Module:
    if kind == "padding-modes":
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, dilation=2, padding=2, padding_mode="replicate"),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", groups=2),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Conv2d(8, 12, 5, padding=2), nn.Tanh(),
            nn.AvgPool2d(3, stride=1, padding=1),
            nn.Conv2d(12, 12, (3, 1), stride=(1, 2), padding=(1, 0)), nn.LeakyReLU(0.1),
        )
    if kind == "residual":
        return nn.Sequential(
            nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            Residual(8, 8, 1), Residual(8, 12, 2), Residual(12, 12, 1),
        )
    if kind == "pools":
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2, dilation=2), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Conv2d(8, 12, 3), nn.Sigmoid(),
            nn.MaxPool2d(2),
        )
    if kind == "concat":
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), Inception(8),
            nn.Conv2d(12, 12, 3, stride=2), nn.GELU(), Inception(12),
        )
    raise ValueError(kind)


class SpatialVQA(nn.Module):
    """A convolutional image branch, a bag-of-words question branch, product, linear."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = _features(kind)
        channels = 12
        self.embedding = nn.Embedding(20, 6, padding_idx=0)
        self.question = nn.Linear(6, channels)
        self.head = nn.Linear(channels, len(TOY_ANSWERS))
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial running statistics
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.features(image).mean(dim=(2, 3))
        words = torch.tanh(self.question(self.embedding(tokens).sum(dim=1)))
        return self.head(pooled * words) * 4.0


def _adapter(module: nn.Module, size: int = 40, **kwargs: Any) -> TorchAdapter:
    return TorchAdapter(module, TOY_ANSWERS, toy_tokenizer(), image_size=size, device="cpu",
                        **kwargs)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _both(adapter: TorchAdapter, image: np.ndarray, **kwargs: Any) -> tuple[Any, Any]:
    fast = Occlusion(adapter, **kwargs).explain(image, QUESTION)
    plain = Occlusion(adapter, incremental="off", **kwargs).explain(image, QUESTION)
    return fast, plain


@pytest.mark.parametrize("kind", ["padding-modes", "residual", "pools", "concat"])
@pytest.mark.parametrize(("shape", "grid"), [((40, 40), 6), ((50, 45), 7)])
def test_occlusion_maps_equal_the_plain_path(
    kind: str, shape: tuple[int, int], grid: int
) -> None:
    """Strides, dilation, padding modes, groups, residual adds, batch norm, max and average
    pools, channel concatenation, uneven cells, and (50 x 45 -> 40 x 40) a resize that
    spreads each cell."""
    adapter = _adapter(SpatialVQA(kind))
    fast, plain = _both(adapter, _image(*shape), grid=grid, batch_size=16)
    assert fast.incremental == "exact", fast.incremental_note
    assert plain.incremental == "off"
    assert np.abs(fast.image_map - plain.image_map).max() <= 1e-5
    assert np.abs(fast.word_map - plain.word_map).max() <= 1e-5
    assert np.abs(fast.scores - plain.scores).max() <= 1e-6
    assert (fast.image_flips, fast.word_flips) == (plain.image_flips, plain.word_flips)
    engine = adapter.incremental._engine
    assert engine is not None and engine.stats["patched"] > 0


@pytest.mark.parametrize("threshold", [0.01, 0.3, 1.0])
def test_engine_logits_equal_the_module_at_any_threshold(threshold: float) -> None:
    module = SpatialVQA("residual")
    engine = IncrementalEngine(module, threshold=threshold)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 3, 40, 40, generator=gen)
    tokens = torch.tensor([[1, 2, 3, 0]])
    batch = x0.repeat(5, 1, 1, 1)
    batch[0, :, 0:3, 0:5] = 0.0  # a corner
    batch[1, :, 37:, 20:] = 1.0  # the bottom edge
    batch[2, 1, 17, 9] += 2.0  # one value in one channel
    batch[3] = torch.randn(3, 40, 40, generator=gen)  # everything
    # item 4 is unchanged
    with torch.inference_mode():
        run = engine.original(x0, tokens)
        got = engine.image_logits(run, batch)
        expected = module(batch, tokens.expand(5, -1))
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    assert float((expected - got).abs().max()) <= 1e-5


def test_reference_model_maps_equal_the_plain_path() -> None:
    from blackbox_vqa.models.reference import reference_adapter

    adapter = reference_adapter()
    image = _image(64, 64, seed=3)
    fast = Occlusion(adapter).explain(image, "what shape is in the image")
    plain = Occlusion(adapter, incremental="off").explain(image, "what shape is in the image")
    assert fast.incremental == "exact", fast.incremental_note
    assert np.abs(fast.image_map - plain.image_map).max() <= 1e-5
    assert np.abs(fast.word_map - plain.word_map).max() <= 1e-5


# -- capability, switches, fallbacks -------------------------------------------------------


def test_capability_is_declared_not_probed() -> None:
    assert isinstance(_adapter(SpatialVQA("pools")), IncrementalScoring)
    assert not isinstance(BrightnessModel(), IncrementalScoring)
    result = Occlusion(BrightnessModel(), grid=2).explain(_image(8, 8), "is it bright")
    assert result.incremental == "off" and result.incremental_note == ""


def test_switches_and_their_validation() -> None:
    assert parse_incremental(" Exact ") == "exact"
    with pytest.raises(InputError, match="incremental"):
        parse_incremental("approximate")
    with pytest.raises(InputError, match="incremental"):
        Occlusion(BrightnessModel(), incremental="fast")
    with pytest.raises(InputError, match="incremental"):
        _adapter(SpatialVQA("pools"), incremental="on")
    adapter = _adapter(SpatialVQA("pools"), incremental="off")
    result = Occlusion(adapter, grid=4).explain(_image(40, 40), QUESTION)
    assert result.incremental == "off"
    assert "turned off" in result.incremental_note


class Untraceable(SpatialVQA):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = super().forward(image, tokens)
        if float(image.mean()) > 100.0:
            return -logits
        return logits


def test_untraceable_module_falls_back_and_says_why() -> None:
    adapter = _adapter(Untraceable("pools"))
    fast, plain = _both(adapter, _image(40, 40), grid=4)
    assert fast.incremental == "off"
    assert "torch.fx" in fast.incremental_note
    assert np.array_equal(fast.image_map, plain.image_map)


class BatchCoupled(SpatialVQA):
    """Breaks the protocol's contract (items depend on their batch): the incremental path
    cannot reproduce it, and the self-check must notice."""

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        features = self.features(image).mean(dim=(2, 3))
        features = features - features.mean(dim=0, keepdim=True) * 0.5
        words = torch.tanh(self.question(self.embedding(tokens).sum(dim=1)))
        return self.head(features * words) * 4.0


def test_self_check_failure_falls_back_to_the_plain_path() -> None:
    adapter = _adapter(BatchCoupled("pools"))
    fast, plain = _both(adapter, _image(40, 40), grid=4, batch_size=8)
    assert fast.incremental == "off"
    assert "self-check failed" in fast.incremental_note
    assert plain.incremental == "off"  # (the maps differ: this model depends on batching)


def _state(module: nn.Module) -> tuple[Any, ...]:
    return (
        {k: v.clone() for k, v in module.state_dict().items()},
        [(name, m.training) for name, m in module.named_modules()],
        [(name, dict(m._forward_hooks), dict(m._forward_pre_hooks),
          dict(m._backward_hooks)) for name, m in module.named_modules()],
        sorted(vars(module)),
    )


def _same_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    weights_a, *rest_a = a
    weights_b, *rest_b = b
    return weights_a.keys() == weights_b.keys() and all(
        torch.equal(weights_a[k], weights_b[k]) for k in weights_a
    ) and rest_a == rest_b


def test_hooked_module_falls_back_and_hooks_stay() -> None:
    module = SpatialVQA("residual")
    seen: list[int] = []
    handle = module.features[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        adapter = _adapter(module)
        fast, plain = _both(adapter, _image(40, 40), grid=4)
    finally:
        handle.remove()
    assert fast.incremental == "off" and "hooks" in fast.incremental_note
    assert np.array_equal(fast.image_map, plain.image_map)
    assert seen  # the user's hook ran


def test_module_state_untouched_after_success_and_after_an_exception() -> None:
    module = SpatialVQA("residual")
    module.train()  # the adapter must restore training flags
    adapter = _adapter(module)
    before = _state(module)
    Occlusion(adapter, grid=4).explain(_image(40, 40), QUESTION)
    assert _same_state(before, _state(module))

    broken = OneAtATime("residual")
    broken.train()
    before = _state(broken)
    adapter = _adapter(broken)
    with pytest.raises(ModelError, match="forward returned shape"):
        Occlusion(adapter, grid=4).explain(_image(40, 40), QUESTION)
    assert "incremental path failed" in adapter.incremental.reason_off(adapter)
    assert _same_state(before, _state(broken))


class OneAtATime(SpatialVQA):
    """Fails on any batch of more than one input, on every path."""

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(image, tokens).view(1, -1)


def test_window_mode_and_blur_baseline_equal_the_plain_path() -> None:
    adapter = _adapter(SpatialVQA("residual"))
    fast, plain = _both(adapter, _image(44, 40, seed=5), window=(12, 10), stride=(8, 7),
                        baseline="blur", words=False)
    assert fast.incremental == "exact", fast.incremental_note
    assert np.abs(fast.image_map - plain.image_map).max() <= 1e-5
