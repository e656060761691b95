"""Hugging Face models (``hf:PATH``): tiny random ViLT and BLIP built from configs.

Occlusion equals a direct computation with ``transformers`` calls; gradients equal
``torch.autograd`` on the same model; integrated gradients equal Captum's; bad input
gives one clear error. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from captum.attr import IntegratedGradients as CaptumIG

from blackbox_vqa.adapters.hf import vqa as huggingface
from blackbox_vqa.adapters.hf.vqa import HfAdapter, word_positions
from blackbox_vqa.errors import (
    InputError,
    ModelError,
    ModelLoadError,
    NotSupportedError,
    QuestionError,
)
from blackbox_vqa.explainers.guided_backprop import GuidedBackprop
from blackbox_vqa.explainers.integrated_gradients import IntegratedGradients
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.specs import ModelOptions, load_model, spec_kind
from blackbox_vqa.text import drop_word

from hf_toys import BLIP_ANSWERS, VILT_ANSWERS, build_blip, build_vilt, write_answers

QUESTION = "what color is the shapes?"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vilt(tmp_path_factory.mktemp("vilt"))


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def vilt(vilt_dir: Path) -> HfAdapter:
    model = load_model(f"hf:{vilt_dir}")
    assert isinstance(model, HfAdapter)
    return model


@pytest.fixture(scope="module")
def answers_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_answers(tmp_path_factory.mktemp("answers") / "answers.txt", BLIP_ANSWERS)


@pytest.fixture
def blip(blip_dir: Path, answers_file: Path) -> HfAdapter:
    model = load_model(f"hf:{blip_dir}", ModelOptions(extra={"answers_file": answers_file}))
    assert isinstance(model, HfAdapter)
    return model


@pytest.fixture
def blip64(blip: HfAdapter) -> HfAdapter:
    """The BLIP model in float64: the random model amplifies float32 rounding (batched vs
    one-at-a-time) to ~1e-6, so exactness to 1e-6 is checked in double precision."""
    return HfAdapter(blip.module.double(), blip.processor, candidates=BLIP_ANSWERS,
                     device="cpu", name="blip64")


def _image(height: int = 64, width: int = 64, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    image[8:30, 20:50] = (220, 30, 30)
    return image


def _pixel_values(adapter: HfAdapter, image: np.ndarray) -> torch.Tensor:
    """Rescale and normalise by hand (images already at the model's size)."""
    proc = adapter.image_processor
    mean = np.asarray(proc.image_mean, dtype=np.float64)
    std = np.asarray(proc.image_std, dtype=np.float64)
    values = (np.asarray(image, dtype=np.float64) / 255.0 - mean) / std
    return torch.from_numpy(values.transpose(2, 0, 1)[None].astype(np.float32))


def _vilt_direct(adapter: HfAdapter, image: np.ndarray, question: str) -> np.ndarray:
    """ViLT's sigmoid scores with plain transformers calls, one input at a time."""
    text = adapter.tokenizer(question, return_tensors="pt")
    pixels = _pixel_values(adapter, image)
    with torch.no_grad():
        logits = adapter.module(**text, pixel_values=pixels,
                                pixel_mask=torch.ones(pixels.shape[0], *pixels.shape[2:],
                                                      dtype=torch.long)).logits
    return torch.sigmoid(logits)[0].double().numpy()


# -- ViLT: loading, scores, occlusion ------------------------------------------------------


def test_vilt_loads_with_id2label_answers_and_sigmoid_scores(vilt: HfAdapter) -> None:
    assert spec_kind("hf:anything") == "hf"
    assert list(vilt.answers) == VILT_ANSWERS
    assert vilt.score_semantics["kind"] == "sigmoid"
    assert vilt.kind == "classifier"
    assert not vilt.module.training


def test_answers_differ_between_inputs(vilt: HfAdapter) -> None:
    predicted = {int(np.argmax(vilt.answer_probs(_image(seed=s), q)))
                 for s in range(6) for q in (QUESTION, "how many are there?")}
    assert len(predicted) > 1


def test_float_images_are_not_rounded(vilt: HfAdapter) -> None:
    image = _image(48, 80)  # resized by the processor (aspect kept)
    as_uint8 = vilt.answer_probs(image, QUESTION)
    np.testing.assert_array_equal(as_uint8, vilt.answer_probs(image.astype(np.float32), QUESTION))
    shifted = vilt.answer_probs(image.astype(np.float32) + 0.4, QUESTION)
    assert not np.array_equal(shifted, as_uint8)  # 0.4 of a level is seen, not rounded away
    # against the processor's own uint8 pipeline, only its resize rounding differs
    ours = vilt.pixel_inputs([image])["pixel_values"]
    theirs = vilt.image_processor(images=image, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    # two passes, each rounded to half a level by Pillow: about one 0-255 level at most
    level = 1 / 255 / min(vilt.image_processor.image_std)
    assert float((ours - theirs).abs().max()) <= 1.25 * level


def test_batched_scores_equal_one_at_a_time(vilt: HfAdapter) -> None:
    images = [_image(seed=1), _image(48, 80, seed=2), _image(seed=3)]
    questions = [QUESTION, "how many?", "is the circle red"]
    batch = vilt.answer_probs_batch(images, questions)
    for row, (image, question) in enumerate(zip(images, questions, strict=True)):
        np.testing.assert_allclose(batch[row], vilt.answer_probs(image, question), atol=1e-6)


def test_vilt_occlusion_equals_direct_transformers_calls(vilt: HfAdapter) -> None:
    image = _image()
    rng_state = torch.random.get_rng_state()
    result = Occlusion(vilt, grid=4, baseline="imagenet-mean").explain(image, QUESTION)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # ViLT's sampling is hidden
    base = _vilt_direct(vilt, image, QUESTION)
    a = result.answer_index
    assert a == int(np.argmax(base))
    expected = np.zeros((4, 4))
    for r in range(4):
        for c in range(4):
            occluded = image.astype(np.float32)
            occluded[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = (123.68, 116.779, 103.939)
            expected[r, c] = base[a] - _vilt_direct(vilt, occluded, QUESTION)[a]
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(result.image_map, expected, rtol=0, atol=1e-6)
    words = [base[a] - _vilt_direct(vilt, image, drop_word(QUESTION, i))[a] for i in range(5)]
    np.testing.assert_allclose(result.word_map, words, rtol=0, atol=1e-6)


# -- gradients -----------------------------------------------------------------------------


def test_word_positions_group_sub_words_and_skip_punctuation() -> None:
    offsets = [(0, 0), (0, 4), (5, 10), (11, 13), (14, 17), (18, 23), (23, 24), (24, 25), (0, 0)]
    assert word_positions(QUESTION, offsets) == ((1,), (2,), (3,), (4,), (5, 6))


def test_word_positions_without_offsets_agree(vilt: HfAdapter) -> None:
    for question in (QUESTION, "how many red squares are there", "is the circle's color blue?"):
        assert vilt.processing._prefix_positions(question) == \
            vilt.processing.word_positions(question)


def _autograd_vilt(
    adapter: HfAdapter, image: np.ndarray, question: str, index: int
) -> tuple[np.ndarray, np.ndarray]:
    text = adapter.tokenizer(question, return_tensors="pt")
    pixels = _pixel_values(adapter, image).requires_grad_(True)
    embeds = adapter.module.get_input_embeddings()(text["input_ids"]).detach()
    embeds.requires_grad_(True)
    logits = adapter.module(inputs_embeds=embeds, attention_mask=text["attention_mask"],
                            token_type_ids=text["token_type_ids"], pixel_values=pixels).logits
    pix_grad, emb_grad = torch.autograd.grad(torch.sigmoid(logits)[0, index], [pixels, embeds])
    return pix_grad[0].numpy(), emb_grad[0].numpy()


@pytest.mark.parametrize("guided", [False, True])
def test_vilt_gradients_equal_autograd(vilt: HfAdapter, guided: bool) -> None:
    image = _image()
    result = GuidedBackprop(vilt, guided=guided).explain(image, QUESTION, answer="blue")
    pix, emb = _autograd_vilt(vilt, image, QUESTION, VILT_ANSWERS.index("blue"))
    np.testing.assert_allclose(result.gradient, pix, rtol=1e-4, atol=1e-6)
    assert result.tokens == ("what", "color", "is", "the", "shapes")
    per_word = [emb[[1]], emb[[2]], emb[[3]], emb[[4]], emb[[5, 6]]]  # "shapes" = shape ##s
    expected = [np.linalg.norm(e.sum(axis=0)) for e in per_word]
    np.testing.assert_allclose(result.word_map, expected, rtol=1e-4, atol=1e-7)
    if guided:  # ViLT uses GELU: nothing was guided, and the result says so
        assert result.relus_guided == 0
        assert "equals the plain gradient" in result.guided_note
    else:
        assert result.relus_guided is None and result.guided_note == ""
    assert not any(p.grad is not None for p in vilt.module.parameters())
    assert not vilt.module.get_input_embeddings()._forward_hooks


def test_training_flags_hooks_and_rng_are_restored_also_on_errors(vilt: HfAdapter) -> None:
    image = _image()
    expected = vilt.answer_probs(image, QUESTION)
    vilt.module.train()
    try:
        np.testing.assert_allclose(vilt.answer_probs(image, QUESTION), expected, atol=1e-6)
        assert vilt.module.training and vilt.module.vilt.training

        def fail(*args: object) -> None:
            raise RuntimeError("boom")

        handle = vilt.module.classifier.register_forward_hook(fail)
        try:
            with pytest.raises(ModelError, match="boom"):
                vilt.input_gradients(image, QUESTION, guided=True)
            with pytest.raises(ModelError, match="boom"):
                IntegratedGradients(vilt, steps=2).explain(image, QUESTION)
        finally:
            handle.remove()
        assert vilt.module.training and vilt.module.vilt.training
        assert not vilt.module.get_input_embeddings()._forward_hooks
        assert not any(p.grad is not None for p in vilt.module.parameters())
    finally:
        vilt.module.eval()


def test_vilt_integrated_gradients_equal_captum(vilt: HfAdapter) -> None:
    image = _image()
    steps = 8
    result = IntegratedGradients(vilt, steps=steps, baseline="black",
                                 batch_size=5).explain(image, QUESTION)
    text = vilt.tokenizer(QUESTION, return_tensors="pt")
    embedding = vilt.module.get_input_embeddings()
    with torch.no_grad():
        words = embedding(text["input_ids"])
        start_words = words.clone()
        start_words[0, 1:7] = embedding.weight[vilt.tokenizer.pad_token_id]
    pixels = _pixel_values(vilt, image)
    black = _pixel_values(vilt, np.zeros_like(image))

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = vilt.module(inputs_embeds=w, attention_mask=text["attention_mask"].expand(
            len(x), -1), token_type_ids=text["token_type_ids"].expand(len(x), -1),
            pixel_values=x).logits
        return torch.sigmoid(logits)

    pix_attr, word_attr = CaptumIG(forward).attribute(
        (pixels, words), baselines=(black, start_words), target=result.answer_index,
        n_steps=steps)
    np.testing.assert_allclose(result.attributions, pix_attr[0].detach().numpy(), atol=1e-4)
    per_token = word_attr[0].detach().double().sum(dim=1).numpy()
    expected = [per_token[1], per_token[2], per_token[3], per_token[4], per_token[5:7].sum()]
    np.testing.assert_allclose(result.word_map, expected, rtol=0, atol=1e-4)
    assert per_token[[0, 7, 8]].tolist() == [0.0, 0.0, 0.0]  # [CLS] ? [SEP] stay fixed
    assert result.completeness()["score_input"] == pytest.approx(result.probability, abs=1e-5)


# -- BLIP: candidate-normalised scores -----------------------------------------------------


def _blip_scores(adapter: HfAdapter, pixels: torch.Tensor, words: torch.Tensor,
                 question: str) -> torch.Tensor:
    """Softmax over candidates of teacher-forced log-likelihoods, one candidate at a time,
    from ``pixel_values`` and the question's token embeddings (differentiable)."""
    model = adapter.module
    cfg = model.config.text_config
    text = adapter.tokenizer(question, return_tensors="pt")
    image_states = model.vision_model(pixel_values=pixels)[0]
    states = model.text_encoder(inputs_embeds=words.clone(),  # BLIP adds to it in place
                                attention_mask=text["attention_mask"],
                                encoder_hidden_states=image_states)[0]
    totals = []
    for answer in adapter.answers:
        ids = [cfg.bos_token_id, *adapter.tokenizer(answer, add_special_tokens=False)["input_ids"],
               cfg.sep_token_id]
        logits = model.text_decoder(input_ids=torch.tensor([ids]),
                                    encoder_hidden_states=states).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        totals.append(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)))
    return torch.softmax(torch.stack(totals), dim=0)


def _blip_direct(adapter: HfAdapter, image: np.ndarray, question: str) -> np.ndarray:
    ids = adapter.tokenizer(question, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        words = adapter.module.get_input_embeddings()(ids)
        pixels = _pixel_values(adapter, image).to(adapter.dtype)
        return _blip_scores(adapter, pixels, words, question).numpy()


def test_blip_scores_candidates_and_adds_its_own_answer(blip: HfAdapter) -> None:
    image = _image(32, 32)
    assert list(blip.answers) == BLIP_ANSWERS
    assert blip.dtype == torch.float32
    scores = blip.answer_probs(image, QUESTION)
    generated = blip.generated_answer
    assert generated is not None
    assert blip.score_semantics["kind"] == "candidate-normalised"
    if generated:
        assert generated in blip.answers
        assert generated == blip.generate_answer(image, QUESTION)
    assert scores.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(scores, _blip_direct(blip, image, QUESTION), rtol=0, atol=1e-5)


def test_only_a_fixed_answer_list_is_served(vilt: HfAdapter, blip: HfAdapter) -> None:
    """The HTTP protocol publishes one answer list: ViLT's is fixed and is served; BLIP's
    generated answer joins its candidates per input, so it is refused (served, it would
    keep the first input's answer for every later one)."""
    pytest.importorskip("fastapi")
    from blackbox_vqa.errors import NotSupportedError
    from blackbox_vqa.server.app import create_app

    assert not vilt.answers_follow_input and blip.answers_follow_input
    create_app(vilt)
    with pytest.raises(NotSupportedError, match="cannot be served: its answer list follows"):
        create_app(blip)


def test_blip_occlusion_equals_direct_transformers_calls(blip64: HfAdapter) -> None:
    blip = blip64
    image = _image(32, 32)
    result = Occlusion(blip, grid=2, baseline="black").explain(image, QUESTION)
    base = _blip_direct(blip, image, QUESTION)
    a = result.answer_index
    expected = np.zeros((2, 2))
    for r in range(2):
        for c in range(2):
            occluded = image.copy()
            occluded[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 0
            expected[r, c] = base[a] - _blip_direct(blip, occluded, QUESTION)[a]
    np.testing.assert_allclose(result.image_map, expected, rtol=0, atol=1e-6)
    words = [base[a] - _blip_direct(blip, image, drop_word(QUESTION, i))[a] for i in range(5)]
    np.testing.assert_allclose(result.word_map, words, rtol=0, atol=1e-6)


def test_blip_gradients_equal_autograd(blip64: HfAdapter) -> None:
    blip = blip64
    image = _image(32, 32)
    result = GuidedBackprop(blip, guided=True).explain(image, QUESTION, answer="blue")
    ids = blip.tokenizer(QUESTION, return_tensors="pt")["input_ids"]
    pixels = _pixel_values(blip, image).to(blip.dtype).requires_grad_(True)
    words = blip.module.get_input_embeddings()(ids).detach().requires_grad_(True)
    score = _blip_scores(blip, pixels, words, QUESTION)[list(blip.answers).index("blue")]
    pix, emb = (g[0].numpy() for g in torch.autograd.grad(score, [pixels, words]))
    np.testing.assert_allclose(result.gradient, pix, rtol=1e-4, atol=1e-7)
    per_word = [emb[[1]], emb[[2]], emb[[3]], emb[[4]], emb[[5, 6]]]
    expected = [np.linalg.norm(e.sum(axis=0)) for e in per_word]
    np.testing.assert_allclose(result.word_map, expected, rtol=1e-4, atol=1e-7)
    assert result.relus_guided == 0  # BLIP uses GELU


def test_blip_gradients_and_integrated_gradients_run(blip: HfAdapter) -> None:
    image = _image(32, 32)
    grads = GuidedBackprop(blip, guided=False).explain(image, QUESTION, answer="red")
    assert grads.gradient.shape == (3, 32, 32) and grads.word_map.shape == (5,)
    assert np.abs(grads.gradient).max() > 0
    ig = IntegratedGradients(blip, steps=4).explain(image, QUESTION, answer="red")
    assert ig.word_map.shape == (5,)
    assert np.isfinite(ig.completeness_gap)


# -- bad input -----------------------------------------------------------------------------


def test_blip_without_candidates_is_refused(blip_dir: Path) -> None:
    with pytest.raises(InputError, match="--answers FILE"):
        load_model(f"hf:{blip_dir}")


def test_too_long_question_is_refused(vilt: HfAdapter) -> None:
    long = " ".join(["what"] * 30)
    with pytest.raises(QuestionError, match="at most 24"):
        vilt.answer_probs(_image(), long)


def test_unsupported_folder_names_the_supported_classes(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8, vocab_size=30)).save_pretrained(tmp_path)
    with pytest.raises(NotSupportedError, match=r"ViltForQuestionAnswering.*Blip"):
        load_model(f"hf:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotSupportedError, match=r"no transformers model config.*supported"):
        load_model(f"hf:{empty}")


def test_hub_id_without_network_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelLoadError, match=r"hub cannot be reached.*local folder"):
        load_model("hf:dandelin/vilt-b32-finetuned-vqa")


def test_missing_local_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="model folder not found"):
        load_model(f"hf:{tmp_path / 'no-such-model'}")


def test_offline_setting_means_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert huggingface.hub_reachable() is False


def test_classifier_refuses_candidates(vilt_dir: Path, answers_file: Path) -> None:
    with pytest.raises(InputError, match="id2label"):
        HfAdapter.from_pretrained(vilt_dir, answers_file=answers_file)


# -- docs --------------------------------------------------------------------------------


def test_docs_python_example_runs(
    vilt_dir: Path, blip_dir: Path, answers_file: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from PIL import Image

    page = Path(__file__).resolve().parents[1] / "docs" / "models" / "hf.md"
    code = page.read_text(encoding="utf-8").split("```python\n", 1)[1].split("```", 1)[0]
    photo = tmp_path / "photo.png"
    Image.fromarray(_image(48, 64)).save(photo)
    for old, new in (("vilt-b32-finetuned-vqa", vilt_dir), ("blip-vqa-base", blip_dir),
                     ("answers.txt", answers_file), ("photo.jpg", photo)):
        code = code.replace(f'"{old}"', repr(str(new)))
    exec(compile(code, "docs/models/hf.md", "exec"), {})
    assert "what" in capsys.readouterr().out


# -- ONNX export ---------------------------------------------------------------------------


def test_all_patches_path_equals_vilt_forward(vilt: HfAdapter) -> None:
    from blackbox_vqa.exporters.hf_onnx import _export_copy, _patch_path_diff, default_samples

    copy_ = _export_copy(vilt)
    assert copy_ is not vilt.module
    assert "visual_embed" not in vars(vilt.module.vilt.embeddings)  # the user's model as it was
    assert _patch_path_diff(vilt, copy_, default_samples()) <= 1e-4


def test_vilt_onnx_export_round_trip(vilt: HfAdapter, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from blackbox_vqa.adapters.hf.onnx import HfOnnxAdapter
    from blackbox_vqa.exporters.hf_onnx import export_hf_model

    result = export_hf_model(vilt, tmp_path / "out")
    assert result.inputs == ("input_ids", "attention_mask", "token_type_ids", "pixel_values",
                             "pixel_mask")
    assert result.onnx_max_diff <= 1e-4 and result.patch_path_max_diff <= 1e-4
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json"} <= files
    assert not [f for f in files if f.startswith(".export-")]
    exported = load_model(str(result.onnx_path))
    assert isinstance(exported, HfOnnxAdapter)
    assert list(exported.answers) == VILT_ANSWERS
    image = _image()
    ours = Occlusion(exported, grid=4).explain(image, QUESTION)
    theirs = Occlusion(vilt, grid=4).explain(image, QUESTION)
    assert ours.answer == theirs.answer
    np.testing.assert_allclose(ours.image_map, theirs.image_map, atol=1e-4)
    np.testing.assert_allclose(ours.word_map, theirs.word_map, atol=1e-4)
    with pytest.raises(InputError, match="already holds"):
        export_hf_model(vilt, tmp_path / "out")


def test_generative_models_are_not_exported(blip: HfAdapter, tmp_path: Path) -> None:
    from blackbox_vqa.exporters.hf_onnx import export_hf_model

    with pytest.raises(NotSupportedError, match="generative"):
        export_hf_model(blip, tmp_path / "blip-out")
    assert not (tmp_path / "blip-out").exists()
