"""Gradients of generative VLMs (tiny offline LLaVA, PaliGemma, Qwen2-VL and Idefics3 from
genvlm_toys): the gradient of the answer's log-likelihood w.r.t. the image equals autograd
through plain transformers calls (Qwen2-VL: w.r.t. the flattened patches, brought back to
the resized image through the processor's own patch order; Idefics3: its one tile), word
rows are sums of their sub-word tokens' gradients, integrated gradients is complete and
equals Captum, the CLI writes both sections, Qwen2-VL's unflattening inverts the processor
exactly, and Idefics3 with several tiles (image splitting) reports "unavailable"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli

pytest.importorskip("transformers")

import torch

from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.adapters.hf.generative_gradients import image_to_patches, patches_to_image
from blackbox_vqa.errors import GradientUnavailableError
from blackbox_vqa.explain import explain
from blackbox_vqa.explainers.integrated_gradients import IntegratedGradients
from genvlm_toys import build, image

DIFFERENTIABLE = ("llava", "paligemma", "qwen2vl", "idefics3")
QUESTION = "what color is the shape"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gengrad")
    return {f: build(f, root / f) for f in DIFFERENTIABLE}


@pytest.fixture(scope="module")
def adapters(folders: dict[str, Path]) -> dict[str, GenerativeAdapter]:
    return {f: GenerativeAdapter.from_pretrained(p, max_tokens=3, device="cpu")
            for f, p in folders.items()}


def _direct_inputs(adapter: GenerativeAdapter, pixels: np.ndarray
                   ) -> tuple[dict[str, Any], torch.Tensor, int, list[int]]:
    """The processor's tensors for the prompt (written here from the chat template), the
    prompt+answer ids, the prompt length and the answer ids."""
    processor = adapter.processor
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
    else:
        prompt = QUESTION
    levels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    inputs = dict(processor(text=[prompt], images=[[levels]], return_tensors="pt"))
    ids = inputs.pop("input_ids")
    answer = list(adapter.answer_ids)
    full = torch.cat([ids, torch.tensor([answer])], dim=1)
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(full)}
    if "token_type_ids" in inputs:
        kwargs["token_type_ids"] = torch.cat(
            [torch.zeros_like(ids), torch.ones((1, len(answer)), dtype=ids.dtype)], dim=1)
    if "mm_token_type_ids" in inputs:  # Qwen2-VL: the answer's tokens are text (0)
        kwargs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros((1, len(answer)), dtype=ids.dtype)],
            dim=1)
    for key in ("image_grid_thw", "pixel_attention_mask"):
        if key in inputs:
            kwargs[key] = inputs[key]
    kwargs["pixel_values"] = inputs["pixel_values"]
    return kwargs, full, ids.shape[1], answer


def _logits(model: Any, kwargs: dict[str, Any], full: torch.Tensor, embeds: torch.Tensor,
            pixels: torch.Tensor) -> torch.Tensor:
    """``model(inputs_embeds=embeds [R, L, D], pixel_values=pixels)``: ``R`` rows of the one
    prompt+answer ``full`` with the images ``pixels`` (Qwen2-VL: ``R`` images' patches
    concatenated, M-RoPE positions from ``get_rope_index``; Idefics3: ``[R, 1, 3, H, W]``)."""
    rows = embeds.shape[0]
    extra = {k: v.expand(rows, *v.shape[1:]) for k, v in kwargs.items()}
    if "image_grid_thw" in extra:
        extra["position_ids"] = model.model.get_rope_index(
            full.expand(rows, -1), extra["mm_token_type_ids"],
            image_grid_thw=extra["image_grid_thw"],
            attention_mask=extra["attention_mask"])[0]
    return model(inputs_embeds=embeds, pixel_values=pixels, **extra).logits


def _as_image(adapter: GenerativeAdapter, kwargs: dict[str, Any], grad: np.ndarray
              ) -> np.ndarray:
    """A gradient (or attribution) w.r.t. the processor's ``pixel_values`` as ``[3, H, W]``
    of its resized image. Qwen2-VL: each patch value is added to the pixel it was copied
    from, found by the processor's own ``patchify`` run on pixel numbers."""
    if "image_grid_thw" not in kwargs:
        return grad.reshape(grad.shape[-3:])
    images = adapter.processor.image_processor
    _, rows, cols = (int(v) for v in kwargs["image_grid_thw"][0])
    shape = (3, rows * images.patch_size, cols * images.patch_size)
    numbers = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    source, _, _ = images.patchify(numbers, images.patch_size, images.merge_size,
                                   images.temporal_patch_size)
    assert source.shape == grad.shape
    summed = np.bincount(np.asarray(source).astype(np.int64).ravel(),
                         weights=grad.astype(np.float64).ravel(), minlength=int(np.prod(shape)))
    return summed.reshape(shape)


def _loglik(model: Any, logits: torch.Tensor, n: int, answer: list[int]) -> torch.Tensor:
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return torch.stack([logp[n - 1 + i, t] for i, t in enumerate(answer)]).sum()


def _direct_gradients(adapter: GenerativeAdapter, pixels: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Autograd of log p(answer) through ``model(inputs_embeds=..., pixel_values=...)``:
    ``(d/d pixel_values [3, H, W], d/d embeddings [T, D] of the prompt, ids)``."""
    model = adapter.module.eval()
    kwargs, full, n, answer = _direct_inputs(adapter, pixels)
    leaf = kwargs.pop("pixel_values").clone().requires_grad_(True)
    embeds = model.get_input_embeddings()(full).detach().requires_grad_(True)
    logits = _logits(model, kwargs, full, embeds, leaf)
    value = _loglik(model, logits, n, answer)
    grad_image, grad_words = torch.autograd.grad(value, [leaf, embeds])
    return (_as_image(adapter, kwargs, grad_image.numpy()), grad_words[0, :n].numpy(),
            [int(t) for t in full[0, :n].tolist()])


def _words_by_decoding(tokenizer: Any, ids: list[int]) -> list[list[int]]:
    """Each question word's token positions, found by decoding (independent of offsets):
    the shortest token run that decodes to the question, split where the decoded prefix
    gains a word."""
    for length in range(1, len(ids) + 1):
        for start in range(len(ids) - length + 1):
            if tokenizer.decode(ids[start:start + length]).strip() == QUESTION:
                words: list[list[int]] = [[] for _ in QUESTION.split()]
                for k in range(start, start + length):
                    prefix = tokenizer.decode(ids[start:k + 1]).strip()
                    words[len(prefix.split()) - 1].append(k)
                return words
    raise AssertionError("the question is not in the prompt")


@pytest.mark.parametrize("family", DIFFERENTIABLE)
def test_gradient_equals_direct_autograd_and_words_sum_sub_words(
    family: str, adapters: dict[str, GenerativeAdapter]
) -> None:
    adapter = adapters[family]
    pixels = image(3, 40)
    grads = adapter.input_gradients(pixels, QUESTION)
    expected_image, per_token, ids = _direct_gradients(adapter, pixels)
    assert grads.image.shape == expected_image.shape
    assert np.abs(expected_image).max() > 1e-4  # the image matters to the answer
    np.testing.assert_allclose(grads.image, expected_image, atol=1e-5, rtol=1e-4)
    assert list(grads.token_ids) == ids
    words = _words_by_decoding(adapter.tokenizer, ids)
    assert any(len(w) > 1 for w in words)  # sub-words really are summed
    assert grads.words is not None
    expected_words = np.stack([per_token[w].sum(axis=0) for w in words])
    np.testing.assert_allclose(grads.words, expected_words, atol=1e-5, rtol=1e-4)
    # the score differentiated is the log-likelihood the adapter scores
    assert np.isclose(np.log(grads.scores[0]), adapter.sequence_logprob(pixels, QUESTION))


def test_other_answer_is_log_one_minus_p(adapters: dict[str, GenerativeAdapter]) -> None:
    adapter = adapters["llava"]
    pixels = image(3, 40)
    own = adapter.input_gradients(pixels, QUESTION)
    other = adapter.input_gradients(pixels, QUESTION, answer=1)
    p = own.scores[0]
    # d log(1-p) = -p/(1-p) d log p
    np.testing.assert_allclose(other.image, -p / (1 - p) * own.image, rtol=1e-3,
                               atol=1e-7)


@pytest.mark.parametrize("family", DIFFERENTIABLE)
def test_integrated_gradients_complete_and_equal_to_captum(
    family: str, folders: dict[str, Path]
) -> None:
    from captum.attr import IntegratedGradients as CaptumIG

    # a given answer that is not the model's own: its log-likelihood moves along the path
    adapter = GenerativeAdapter.from_pretrained(folders[family], answer="blue square",
                                                device="cpu")
    pixels = image(3, 40)
    steps = 128 if family == "qwen2vl" else 64  # its path bends more: 64 points miss 2e-3
    result = IntegratedGradients(adapter, steps=steps, baseline="black",
                                 batch_size=16).explain(pixels, QUESTION, answer=0)
    delta = result.score_input - result.score_baseline
    assert abs(delta) > 0.05
    # completeness: Gauss-Legendre points; stated tolerance 1e-3 nats (relative 1e-3)
    assert abs(result.attribution_sum - delta) <= 1e-3 * max(1.0, abs(delta))
    assert np.isclose(result.score_input, adapter.sequence_logprob(pixels, QUESTION))

    model = adapter.module.eval()
    kwargs, full, n, answer = _direct_inputs(adapter, pixels)
    image_in = kwargs.pop("pixel_values")
    start_kwargs, _, _, _ = _direct_inputs(adapter, np.zeros_like(pixels))
    image_start = start_kwargs["pixel_values"]
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        embeds = embedding(full)
        pad = embedding(torch.tensor([adapter.pad_id]))[0]
    ids = [int(t) for t in full[0, :n].tolist()]
    words = _words_by_decoding(adapter.tokenizer, ids)
    prompt_in = embeds[:, :n].clone()
    prompt_start = prompt_in.clone()
    for w in words:
        prompt_start[0, w] = pad
    tail = embeds[:, n:]

    def forward(x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        rows = prompt.shape[0]
        inputs = torch.cat([prompt, tail.expand(rows, -1, -1)], dim=1)
        logits = _logits(model, kwargs, full, inputs, x)
        logp = torch.log_softmax(logits.double(), dim=-1)
        picked = torch.stack([logp[:, n - 1 + i, t] for i, t in enumerate(answer)], dim=1)
        return picked.sum(dim=1)

    image_attr, word_attr = CaptumIG(forward).attribute(
        (image_in, prompt_in), baselines=(image_start, prompt_start), n_steps=steps,
        method="gausslegendre", internal_batch_size=16)
    expected = _as_image(adapter, kwargs, image_attr.double().numpy())
    np.testing.assert_allclose(result.attributions, expected, atol=1e-4, rtol=1e-3)
    per_token = word_attr[0].double().numpy().sum(axis=1)
    expected_words = np.array([per_token[w].sum() for w in words])
    np.testing.assert_allclose(result.word_map, expected_words, atol=1e-4)


def test_qwen2vl_unflattening_inverts_the_processor_exactly(
    adapters: dict[str, GenerativeAdapter]
) -> None:
    images = adapters["qwen2vl"].processor.image_processor
    sizes = {"patch": images.patch_size, "merge": images.merge_size,
             "temporal": images.temporal_patch_size}
    # the processor's own output: flatten(unflatten(x)) == x, bit for bit
    kwargs, _, _, _ = _direct_inputs(adapters["qwen2vl"], image(3, 40))
    patches = kwargs["pixel_values"]
    _, rows, cols = (int(v) for v in kwargs["image_grid_thw"][0])
    resized = patches_to_image(patches, (rows, cols), **sizes)
    assert resized.shape == (3, rows * images.patch_size, cols * images.patch_size)
    assert torch.equal(image_to_patches(resized[None], **sizes), patches)
    # a non-square image through the processor's patchify: unflatten(flatten(x)) == x
    x = np.random.default_rng(0).standard_normal((3, 32, 64)).astype(np.float32)
    flat, rows, cols = images.patchify(x, images.patch_size, images.merge_size,
                                       images.temporal_patch_size)
    back = patches_to_image(torch.from_numpy(np.ascontiguousarray(flat)), (rows, cols),
                            **sizes)
    assert torch.equal(back, torch.from_numpy(x))
    assert torch.equal(image_to_patches(back[None], **sizes),
                       torch.from_numpy(np.ascontiguousarray(flat)))


def _tiled(folders: dict[str, Path], root: Path) -> Path:
    """The tiny Idefics3 with image splitting on: 4 crops and a global view."""
    folder = root / "idefics3-tiles"
    shutil.copytree(folders["idefics3"], folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["do_image_splitting"] = True
    config["image_processor"]["size"] = {"longest_edge": 64}
    (folder / "processor_config.json").write_text(json.dumps(config))
    return folder


def test_tiled_idefics3_is_unavailable_with_the_reason(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    adapter = GenerativeAdapter.from_pretrained(_tiled(folders, tmp_path), max_tokens=3,
                                                device="cpu")
    with pytest.raises(GradientUnavailableError, match=r"splits the image into 5 tiles"):
        adapter.input_gradients(image(3, 40), QUESTION)
    found = explain(adapter, image(3, 40), QUESTION,
                    methods="gradient,integrated-gradients,occlusion", grid=2)
    assert set(found.unavailable) == {"gradient", "integrated-gradients"}
    for gone in found.unavailable.values():
        assert "Idefics3ForConditionalGeneration" in gone.reason
        assert "with image splitting off, one tile, gradients are available" in gone.reason
    assert "occlusion" in found.attributions


def test_candidate_mode_is_unavailable(folders: dict[str, Path], tmp_path: Path) -> None:
    answers = tmp_path / "answers.txt"
    answers.write_text("red\nblue\n")
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], answers_file=answers,
                                                device="cpu")
    with pytest.raises(GradientUnavailableError, match="candidate answers"):
        adapter.gradient_inputs(image(3, 40), QUESTION)


@pytest.mark.parametrize("family", DIFFERENTIABLE)
def test_cli_writes_gradient_and_integrated_gradients(
    family: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    picture = tmp_path / "picture.png"
    Image.fromarray(image(3, 40)).save(picture)
    out = tmp_path / "out"
    code, _, err = run_cli([
        "explain", "-m", f"hf:{folders[family]}", "-i", str(picture), "-q", QUESTION,
        "--method", "gradient,integrated-gradients", "--ig-steps", "8", "--max-tokens", "3",
        "--threads", "1", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    for key in ("gradient", "integrated_gradients"):
        section = doc[key]
        assert np.isfinite(np.asarray(section["image"], dtype=float)).all()
        assert np.abs(np.asarray(section["image"], dtype=float)).sum() > 0
        assert len(section["tokens"]) == len(QUESTION.split())


def test_cli_reports_unavailable_for_tiled_idefics3(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    picture = tmp_path / "picture.png"
    Image.fromarray(image(3, 40)).save(picture)
    out = tmp_path / "out"
    code, _, err = run_cli([
        "explain", "-m", f"hf:{_tiled(folders, tmp_path)}", "-i", str(picture), "-q", QUESTION,
        "--method", "gradient,occlusion", "--grid", "2", "--max-tokens", "3",
        "--threads", "1", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["gradient"]["available"] is False
    assert "splits the image into 5 tiles" in doc["gradient"]["reason"]
    assert doc["occlusion"].get("available") is not False
