"""Gradients of generative VLMs (tiny offline LLaVA and PaliGemma from genvlm_toys): the
gradient of the answer's log-likelihood w.r.t. pixel_values equals autograd through plain
transformers calls, word rows are sums of their sub-word tokens' gradients, integrated
gradients is complete and equals Captum, the CLI writes both sections, and families whose
pixel tensor is not one image (Qwen2-VL patches, Idefics3 tiles) report "unavailable"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli

pytest.importorskip("transformers")

import torch

from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.errors import GradientUnavailableError
from blackbox_vqa.explain import explain
from blackbox_vqa.explainers.integrated_gradients import IntegratedGradients
from genvlm_toys import build, image

DIFFERENTIABLE = ("llava", "paligemma")
QUESTION = "what color is the shape"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gengrad")
    return {f: build(f, root / f) for f in (*DIFFERENTIABLE, "qwen2vl")}


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
    kwargs["pixel_values"] = inputs["pixel_values"]
    return kwargs, full, ids.shape[1], answer


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
    logits = model(inputs_embeds=embeds, pixel_values=leaf, **kwargs).logits
    value = _loglik(model, logits, n, answer)
    grad_image, grad_words = torch.autograd.grad(value, [leaf, embeds])
    return (grad_image[0].numpy(), grad_words[0, :n].numpy(),
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
    result = IntegratedGradients(adapter, steps=64, baseline="black",
                                 batch_size=16).explain(pixels, QUESTION, answer=0)
    delta = result.score_input - result.score_baseline
    assert abs(delta) > 0.05
    # completeness: 64 Gauss-Legendre points; stated tolerance 1e-3 nats (relative 1e-3)
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
        extra = {k: v.expand(rows, -1) for k, v in kwargs.items()}
        logits = model(inputs_embeds=inputs, pixel_values=x, **extra).logits
        logp = torch.log_softmax(logits.double(), dim=-1)
        picked = torch.stack([logp[:, n - 1 + i, t] for i, t in enumerate(answer)], dim=1)
        return picked.sum(dim=1)

    image_attr, word_attr = CaptumIG(forward).attribute(
        (image_in, prompt_in), baselines=(image_start, prompt_start), n_steps=64,
        method="gausslegendre", internal_batch_size=16)
    np.testing.assert_allclose(result.attributions, image_attr[0].double().numpy(),
                               atol=1e-4, rtol=1e-3)
    per_token = word_attr[0].double().numpy().sum(axis=1)
    expected_words = np.array([per_token[w].sum() for w in words])
    np.testing.assert_allclose(result.word_map, expected_words, atol=1e-4)


def test_patch_family_is_unavailable_with_the_reason(
    adapters: dict[str, GenerativeAdapter]
) -> None:
    adapter = adapters["qwen2vl"]
    with pytest.raises(GradientUnavailableError, match=r"pixel_values of shape \d+x\d+"):
        adapter.input_gradients(image(3, 40), QUESTION)
    found = explain(adapter, image(3, 40), QUESTION,
                    methods="gradient,integrated-gradients,occlusion", grid=2)
    assert set(found.unavailable) == {"gradient", "integrated-gradients"}
    for gone in found.unavailable.values():
        assert "Qwen2VLForConditionalGeneration" in gone.reason
        assert "not one [1, 3, H, W] image" in gone.reason
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


def test_cli_reports_unavailable_for_a_patch_family(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    picture = tmp_path / "picture.png"
    Image.fromarray(image(3, 40)).save(picture)
    out = tmp_path / "out"
    code, _, err = run_cli([
        "explain", "-m", f"hf:{folders['qwen2vl']}", "-i", str(picture), "-q", QUESTION,
        "--method", "gradient,occlusion", "--grid", "2", "--max-tokens", "3",
        "--threads", "1", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["gradient"]["available"] is False
    assert "not one [1, 3, H, W] image" in doc["gradient"]["reason"]
    assert doc["occlusion"].get("available") is not False
