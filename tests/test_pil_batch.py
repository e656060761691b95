"""The PIL image processors' pipeline over a batch (adapters/hf/pil_batch.py): bit for bit
the processor's own output, applied only where it can be, and dropped for good on a
processor where the first check finds any difference."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.image_processing_backends")

from blackbox_vqa.adapters.hf import pil_batch  # noqa: E402
from blackbox_vqa.adapters.hf.generative import GenerativeAdapter  # noqa: E402
from blackbox_vqa.adapters.hf.generative_inputs import image_key  # noqa: E402

PT = {"return_tensors": "pt"}


def _images(count: int, shape: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8) for _ in range(count)]


def _processors() -> list[tuple[str, Any]]:
    tf: Any = transformers
    return [
        ("clip-tiny", tf.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                               crop_size={"height": 32, "width": 32})),
        ("clip-336", tf.CLIPImageProcessorPil(size={"shortest_edge": 336},
                                              crop_size={"height": 336, "width": 336})),
        ("clip-crop", tf.CLIPImageProcessorPil(size={"shortest_edge": 40},
                                               crop_size={"height": 24, "width": 36})),
        ("clip-bilinear-unnormalised", tf.CLIPImageProcessorPil(
            size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20}, resample=2,
            do_normalize=False)),
        ("clip-raw-levels", tf.CLIPImageProcessorPil(
            size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20},
            do_rescale=False, do_normalize=True, image_mean=0.5, image_std=0.25)),
        ("siglip", tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})),
        ("siglip-224", tf.SiglipImageProcessorPil(size={"height": 224, "width": 224})),
    ]


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (97, 31)])
@pytest.mark.parametrize("name_processor", _processors(), ids=lambda p: p[0])
def test_batch_equals_the_processor_bit_for_bit(name_processor: tuple[str, Any],
                                                shape: tuple[int, int]) -> None:
    _, processor = name_processor
    images = _images(5, shape, seed=shape[0])
    ours = pil_batch.processed(processor, images, PT)
    plain = processor(images, **PT)
    assert ours is not None
    assert set(ours.keys()) == set(plain.keys()) == {"pixel_values"}
    assert ours["pixel_values"].dtype == plain["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], plain["pixel_values"])
    # as numpy arrays, and with settings given in the call
    found = pil_batch.processed(processor, images, {"return_tensors": "np"})
    assert found is not None
    assert np.array_equal(found["pixel_values"],
                          processor(images, return_tensors="np")["pixel_values"])
    call = {**PT, "data_format": "channels_first", "do_resize": False,
            "do_center_crop": False}
    found = pil_batch.processed(processor, images, call)
    assert found is not None
    assert torch.equal(found["pixel_values"], processor(images, **call)["pixel_values"])


def test_left_to_the_processor_where_it_does_not_apply() -> None:
    tf: Any = transformers
    clip = tf.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32})
    images = _images(3, (40, 40))
    assert pil_batch.processed(clip, images[:1], PT) is None  # one image: nothing to batch
    assert pil_batch.processed(clip, images, {}) is None  # a list of arrays asked for
    assert pil_batch.processed(clip, images, {**PT, "input_data_format": "channels_last"}) \
        is None  # a layout the batch does not follow
    mixed = [images[0], _images(1, (40, 41))[0]]
    assert pil_batch.processed(clip, mixed, PT) is None  # two shapes
    floats = [im.astype(np.float32) for im in images]
    assert pil_batch.processed(clip, floats, PT) is None  # not uint8
    grey = [im[..., 0] for im in images]
    assert pil_batch.processed(clip, grey, PT) is None  # not RGB
    own_steps = [  # processors with steps of their own
        tf.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                  max_image_size={"longest_edge": 32}),
        tf.Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                    min_pixels=32 * 32, max_pixels=32 * 32),
    ]
    for processor in own_steps:
        assert pil_batch.processed(processor, images, PT) is None

    class Brighter(tf.CLIPImageProcessorPil):  # type: ignore[misc]
        def rescale(self, image: Any, scale: float, **kwargs: Any) -> Any:
            return super().rescale(image, scale * 1.01, **kwargs)

    assert pil_batch.processed(Brighter(), images, PT) is None

    class Unhashable(tf.CLIPImageProcessorPil):  # type: ignore[misc]
        __hash__ = None  # type: ignore[assignment]

    assert pil_batch.processed(Unhashable(), images, PT) is None  # no place for its check


def test_a_difference_at_the_first_check_hands_the_processor_back_for_good(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tf: Any = transformers
    processor = tf.SiglipImageProcessorPil(size={"height": 16, "width": 16})
    images = _images(4, (30, 30))
    honest = pil_batch._batched
    calls: list[int] = []

    def off_by_a_little(*args: Any) -> Any:
        calls.append(1)
        batch = honest(*args)
        return batch + np.float32(1e-6)

    monkeypatch.setattr(pil_batch, "_batched", off_by_a_little)
    assert pil_batch.processed(processor, images, PT) is None
    assert list(pil_batch._CHECKED[processor].values()) == [False]
    assert pil_batch.processed(processor, images, PT) is None
    assert calls == [1]  # not tried again on this processor and shape
    monkeypatch.setattr(pil_batch, "_batched", honest)
    other = _images(4, (31, 30))  # another shape is checked on its own
    assert pil_batch.processed(processor, other, PT) is not None


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_the_adapter_encodes_the_same_tensors_either_way(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole occlusion batch (cells and word drops, repeated images) through the
    adapter's encode equals the plain processor's tensors."""
    from genvlm_toys import build, image

    folder = build(family, Path(tempfile.mkdtemp()) / family)
    adapter = GenerativeAdapter.from_pretrained(folder, max_tokens=2)
    pixels = image(3, 48)
    images, questions = [pixels], ["what color is it"]
    for r in range(3):
        occluded = pixels.copy()
        occluded[r * 16:(r + 1) * 16, :16] = 128
        images.append(occluded)
        questions.append("what color is it")
    images += [pixels, pixels]
    questions += ["color is it", "what is it"]
    keys = [image_key(im) for im in images]
    fast = adapter.encode(images, questions, keys=keys)
    used: list[int] = []
    inner = pil_batch.processed

    def counted(*args: Any) -> Any:
        found = inner(*args)
        used.append(found is not None)
        return found

    monkeypatch.setattr("blackbox_vqa.adapters.hf.generative_inputs.processed", counted)
    adapter.encode(images, questions, keys=keys)
    assert used == [True]
    monkeypatch.setattr("blackbox_vqa.adapters.hf.generative_inputs.processed",
                        lambda *args: None)
    plain = adapter.encode(images, questions, keys=keys)
    assert set(fast) == set(plain)
    for key in plain:
        assert torch.equal(fast[key], plain[key]), key
