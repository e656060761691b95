"""Reuse within one explanation (vision output, prompt-prefix key/value cache) changes no
score: on the four tiny families, word-drop and image-cell inputs scored with the caches
equal the plain unbatched, uncached computation (direct transformers calls) to 1e-5 in
log-probability for batch sizes 1, 5 and 40; the caches stay bounded and a new input
clears them."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from blackbox_vqa.adapters.hf import generative_reuse as reuse
from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.adapters.hf.generative_inputs import gathered, images_once
from blackbox_vqa.adapters.hf.generative_reuse import (
    PREFIX_ENTRIES,
    VISION_ENTRIES,
    Reuse,
)
from blackbox_vqa.explain import explain
from genvlm_toys import build, image
from test_generative import _direct

FAMILIES = ("llava", "qwen2vl", "idefics3", "paligemma")
QUESTION = "what color is the shape in the picture"
GRID, SIZE = 4, 40


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genreuse")
    return {family: build(family, root / family) for family in FAMILIES}


def _inputs(pixels: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """The original, every cell of a 4 x 4 grid filled black, then every word dropped."""
    images, questions = [pixels], [QUESTION]
    cell = SIZE // GRID
    for r in range(GRID):
        for c in range(GRID):
            filled = pixels.copy()
            filled[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 0
            images.append(filled)
            questions.append(QUESTION)
    words = QUESTION.split()
    for i in range(len(words)):
        images.append(pixels)
        questions.append(" ".join(words[:i] + words[i + 1:]))
    return images, questions


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_scores_equal_plain_unbatched_uncached(
    family: str, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = GenerativeAdapter.from_pretrained(folders[family], max_tokens=3, device="cpu")
    pixels = image(3, SIZE)
    adapter.prepare(pixels, QUESTION)
    images, questions = _inputs(pixels)
    answer = list(adapter.answer_ids)
    expected = np.array([_direct(adapter, im, q, answer)
                         for im, q in zip(images, questions, strict=True)])
    assert np.ptp(expected) > 1e-3  # the inputs do change the score
    # every shared prefix reused (a call costs nothing), and only where it pays (the
    # default: on these tiny models never)
    for size, call in itertools.product((1, 5, 40), (0.0, reuse.CALL_MACS)):
        monkeypatch.setattr(reuse, "CALL_MACS", call)
        monkeypatch.setattr(reuse, "CALL_TOKENS", 16 if call else 0)
        adapter.reuse.clear()
        adapter.reuse.counts = dict.fromkeys(adapter.reuse.counts, 0)
        adapter.batch_size = size
        found = np.log(adapter.answer_probs_batch(images, questions)[:, 0])
        assert np.abs(found - expected).max() < 1e-5, (family, size, call)
        counts = adapter.reuse.counts
        assert counts["vision_runs"] == 1 + GRID * GRID  # the original's once
        batches = -(-len(images) // size)
        if family == "paligemma":  # bidirectional prefix: vision output only
            assert counts["prefix_kept"] == counts["prefix_hits"] == 0
            assert counts["passes"] == batches
        elif call == 0.0 and size > 1:  # the cells' text before the image, the word drops
            assert counts["prefix_hits"] >= 2 and counts["prefix_kept"] >= 1
            assert counts["passes"] > batches
        elif call == 0.0:  # one row a batch: each row's cache kept, one pass each
            assert counts["prefix_kept"] == len(images) and counts["passes"] == batches
        else:  # a tiny model: one pass per batch, no prefix reuse
            assert counts["prefix_hits"] == 0 and counts["passes"] == batches


def test_reuse_pays_when_the_saved_work_outweighs_the_extra_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reuse, "CALL_MACS", 2e7)
    monkeypatch.setattr(reuse, "CALL_TOKENS", 16)
    # the tiny LLaVA (82240 multiply-adds a token): 8 rows x 20 prefix tokens saved = 160
    # tokens, a call 2e7 / 82240 + 16 = 259 tokens' worth
    assert not reuse.reuse_pays(8, 20, 82240.0, 1)
    assert not reuse.reuse_pays(8, 20, 82240.0, 0)  # no extra call: still one's worth
    assert reuse.reuse_pays(16, 20, 82240.0, 0)  # 320 tokens
    assert not reuse.reuse_pays(8, 0, 1e9, 0)  # nothing shared: nothing saved
    # the SmolVLM-256M shape's language model (1.06e8): 8 x 70 = 560 tokens against 16.2
    assert reuse.reuse_pays(8, 70, 1.06e8, 1)
    assert not reuse.reuse_pays(1, 16, 1.06e8, 1)  # 16 tokens against 16.2
    # a call of 4 + 16 tokens' worth: 4 x 5 pays (exactly), 4 x 4 does not, two calls 40
    assert reuse.reuse_pays(4, 5, 5e6, 1) and not reuse.reuse_pays(4, 4, 5e6, 1)
    assert not reuse.reuse_pays(4, 5, 5e6, 2) and reuse.reuse_pays(8, 5, 5e6, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_with_and_without_reuse_are_equal(family: str, folders: dict[str, Path]) -> None:
    maps = []
    for on in (True, False):
        adapter = GenerativeAdapter.from_pretrained(folders[family], max_tokens=3,
                                                    device="cpu", reuse=on)
        result = explain(adapter, image(4, SIZE), QUESTION, methods="occlusion", grid=GRID,
                         baseline="0,0,0", score="log-probability", batch_size=7)
        found = result.attribution("occlusion")
        maps.append((found.image_map, found.word_map))
    # float32 throughout the model: a word's map value is a difference of log-likelihoods
    # around 20 in size, whose rounding depends on the CPU's kernels (one Qwen2-VL word
    # differed by 1.1e-5, 5.5e-6 relative, on a 16-core machine; 4e-6 here): 1e-5 plus
    # 1e-5 relative
    np.testing.assert_allclose(maps[0][0], maps[1][0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(maps[0][1], maps[1][1], atol=1e-5, rtol=1e-5)


def test_caches_are_bounded_and_cleared_by_a_new_input(folders: dict[str, Path]) -> None:
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], max_tokens=3, device="cpu",
                                                batch_size=4)
    adapter.prepare(image(3, SIZE), QUESTION)
    for seed in range(6):  # many distinct images and questions through one adapter
        images = [image(100 + seed * 10 + i, SIZE) for i in range(10)]
        questions = [QUESTION if i % 2 else f"is it {i} red" for i in range(10)]
        adapter.answer_probs_batch(images, questions)
        vision, prefixes = adapter.reuse.sizes
        assert vision <= 1 + VISION_ENTRIES and prefixes <= PREFIX_ENTRIES
    adapter.prepare(image(4, SIZE), QUESTION)  # a new input: both caches dropped
    assert adapter.reuse.sizes == (0, 0)
    adapter.prepare(image(4, SIZE), QUESTION)
    adapter.answer_probs_batch([image(4, SIZE)], [QUESTION])
    assert adapter.reuse.sizes[0] == 1
    adapter.prepare(image(4, SIZE), QUESTION)  # the same input again keeps them
    assert adapter.reuse.sizes[0] == 1


def test_other_families_take_the_plain_path() -> None:
    class Config:
        image_token_id = 5

    class Model:
        config = Config()

    assert not Reuse(Model(), "blip-2").enabled
    assert Reuse(Model(), "paligemma").enabled and not Reuse(Model(), "paligemma").prefix_kv


class _Counting:
    """An image processor that records how many images each call gets."""

    def __init__(self, inner: object) -> None:
        self.inner, self.seen = inner, []  # type: list[int]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def __call__(self, images: list[object], *args: object, **kwargs: object) -> object:
        self.seen.append(len(images))
        return self.inner(images, *args, **kwargs)  # type: ignore[operator]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_repeated_image_is_processed_once_with_the_same_tensors(
    family: str, folders: dict[str, Path]
) -> None:
    adapter = GenerativeAdapter.from_pretrained(folders[family], max_tokens=3, device="cpu")
    pixels, other = image(3, SIZE), image(4, SIZE)
    images = [pixels, other, pixels.copy(), pixels, other, other]
    questions = [QUESTION, QUESTION, "what color", "is it red", "the shape", QUESTION]
    inner, tokenizer = adapter.processor.image_processor, adapter.processor.tokenizer
    counting, texts = _Counting(inner), _Counting(tokenizer)
    adapter.processor.image_processor, adapter.processor.tokenizer = counting, texts
    try:
        found = adapter.encode(images, questions)
    finally:
        adapter.processor.image_processor, adapter.processor.tokenizer = inner, tokenizer
    assert counting.seen == [2]  # two distinct images, each once
    assert texts.seen[-1] == 4  # four distinct prompts of six, each tokenised once
    prompts = [adapter.prompts(q) for q in questions]
    adapter.tokenizer.padding_side = "right"
    expected = adapter.processor(text=prompts, images=[[im] for im in images], padding=True,
                                 return_tensors="pt")
    assert set(found) == {k for k in expected if k != "labels"}
    for key, value in found.items():
        assert torch.equal(value, expected[key]), (family, key)


def test_the_image_processor_is_restored_after_an_error(folders: dict[str, Path]) -> None:
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], max_tokens=3, device="cpu")
    inner, tokenizer = adapter.processor.image_processor, adapter.processor.tokenizer
    with pytest.raises(RuntimeError), images_once(adapter.processor, [], []):
        assert adapter.processor.image_processor is not inner
        assert adapter.processor.tokenizer is not tokenizer
        raise RuntimeError("boom")
    assert adapter.processor.image_processor is inner
    assert adapter.processor.tokenizer is tokenizer


def test_gathered_repeats_rows_and_qwen_patches() -> None:
    out = {"pixel_values": torch.arange(6.0).reshape(3, 2), "rows": [[1], [2], [3]]}
    found = gathered(out, [2, 0, 2], 3)
    assert found is not None
    assert torch.equal(found["pixel_values"], torch.tensor([[4.0, 5.0], [0.0, 1.0], [4.0, 5.0]]))
    assert found["rows"] == [[3], [1], [3]]
    grid = torch.tensor([[1, 1, 2], [1, 1, 1]])  # 2 patches, then 1
    qwen = {"pixel_values": torch.tensor([[0.0], [1.0], [2.0]]), "image_grid_thw": grid}
    found = gathered(qwen, [1, 0, 1], 2)
    assert found is not None
    assert found["pixel_values"].flatten().tolist() == [2.0, 0.0, 1.0, 2.0]
    assert found["image_grid_thw"].tolist() == [[1, 1, 1], [1, 1, 2], [1, 1, 1]]
    assert gathered({"pixel_values": torch.zeros(3, 2), "scale": 2.0}, [0, 0, 1], 2) is None


@pytest.mark.parametrize("family", ("llava", "qwen2vl"))
def test_prefetching_the_next_batch_changes_no_score(family: str,
                                                     folders: dict[str, Path]) -> None:
    adapter = GenerativeAdapter.from_pretrained(folders[family], max_tokens=3, device="cpu",
                                                batch_size=3)
    pixels = image(3, SIZE)
    adapter.prepare(pixels, QUESTION)
    images, questions = _inputs(pixels)
    found = {}
    for prefetch in (False, True):  # on by default on CUDA only; the same code on the CPU
        adapter.prefetch = prefetch
        adapter.reuse.clear()
        found[prefetch] = (adapter.answer_probs_batch(images, questions),
                           adapter.answer_probs_with_token_logprobs(images, questions)[1])
    np.testing.assert_array_equal(found[True][0], found[False][0])
    np.testing.assert_array_equal(found[True][1], found[False][1])
