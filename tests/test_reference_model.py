"""The built-in reference model: shipped weights, accuracy, padding independence, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from blackbox_vqa.errors import InputError, ModelLoadError
from blackbox_vqa.models.easyvqa_net import EasyVQANet, NetConfig
from blackbox_vqa.models.reference import (
    METADATA_FILE,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
    load_reference_metadata,
    load_reference_model,
    reference_adapter,
)
from blackbox_vqa.models.training import (
    DISTRACTOR_GREY,
    TrainConfig,
    add_distractors,
    background_masks,
    load_split,
    normalise,
    pad_questions,
    save_weights,
    train_reference_model,
)

easy_vqa = pytest.importorskip("easy_vqa")

TEST_QUESTIONS = 9673
SAMPLE_STEP = 48  # every 48th test question: 202 questions over ~200 images


def test_shipped_weights_are_small_and_load_with_weights_only() -> None:
    path = WEIGHTS_DIR / WEIGHTS_FILE
    assert path.stat().st_size < 5 * 1024 * 1024
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    module, tokenizer, answers, pre = load_reference_model()
    assert answers == list(easy_vqa.get_answers())
    assert pre["image_size"] == [64, 64] and pre["output"] == "softmax"
    assert len(pre["mean"]) == 3 and len(pre["std"]) == 3
    assert not module.training
    assert sum(isinstance(m, nn.Embedding) for m in module.modules()) == 1
    assert any(isinstance(m, nn.ReLU) for m in module.modules())
    assert tokenizer("what color is the shape?")[0] > 1
    meta = load_reference_metadata()
    assert meta["evaluation"]["items"] == TEST_QUESTIONS
    assert meta["evaluation"]["accuracy"] >= 0.97


def test_accuracy_on_a_fixed_sample_of_test_questions() -> None:
    answers = list(easy_vqa.get_answers())
    sample = load_split("test", answers, indices=range(0, TEST_QUESTIONS, SAMPLE_STEP))
    model = reference_adapter()
    images = [sample.images[i] for i in sample.image_index]
    probs = model.answer_probs_batch(images, sample.questions)
    accuracy = float(np.mean(probs.argmax(axis=1) == sample.answers))
    assert len(sample) == 202
    assert accuracy >= 0.95, accuracy


def _questions_of_different_lengths() -> list[str]:
    return [
        "what color is the shape?",
        "is there a red shape?",
        "does the image not contain a blue circle in the image?",
        "what shape?",
    ]


def test_question_embedding_ignores_right_padding() -> None:
    module, tokenizer, _, _ = load_reference_model()
    questions = _questions_of_different_lengths()
    batch = pad_questions(tokenizer, questions)
    assert batch.shape[1] > min(len(tokenizer(q)) for q in questions)
    with torch.no_grad():
        together = module.embed_question(batch)
        for row, question in enumerate(questions):
            alone = module.embed_question(pad_questions(tokenizer, [question]))
            torch.testing.assert_close(alone[0], together[row], rtol=0, atol=1e-6)
            extra = torch.zeros(1, 5, dtype=torch.int64)
            padded = torch.cat([pad_questions(tokenizer, [question]), extra], dim=1)
            torch.testing.assert_close(module.embed_question(padded), alone, rtol=0, atol=1e-6)


def test_logits_of_an_item_do_not_depend_on_its_batch() -> None:
    module, tokenizer, _, pre = load_reference_model()
    questions = _questions_of_different_lengths()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(len(questions), 64, 64, 3), dtype=np.uint8)
    images = normalise(torch.from_numpy(pixels), pre["mean"], pre["std"])
    with torch.no_grad():
        together = module(images, pad_questions(tokenizer, questions))
        for row, question in enumerate(questions):
            alone = module(images[row : row + 1], pad_questions(tokenizer, [question]))
            torch.testing.assert_close(alone[0], together[row], rtol=0, atol=1e-5)


def test_empty_token_row_gives_finite_logits() -> None:
    module = EasyVQANet(NetConfig(vocab_size=10)).eval()
    with torch.no_grad():
        out = module(torch.zeros(2, 3, 64, 64), torch.tensor([[0, 0], [3, 0]]))
    assert out.shape == (2, 13) and torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_traced_module_accepts_other_batch_and_question_lengths() -> None:
    module = EasyVQANet(NetConfig(vocab_size=10)).eval()
    torch.manual_seed(0)
    example = (torch.randn(2, 3, 64, 64), torch.tensor([[2, 3, 4], [5, 0, 0]]))
    traced = torch.jit.trace(module, example)
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.tensor([[2, 3, 4, 5, 6, 7], [8, 9, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(traced(images, tokens), module(images, tokens))


def test_net_config_round_trips_and_validates() -> None:
    config = NetConfig(vocab_size=20, channels=(8, 8, 8, 8))
    assert NetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(InputError, match="image_size"):
        NetConfig(vocab_size=20, image_size=63)
    with pytest.raises(InputError, match="vocab_size"):
        NetConfig(vocab_size=1)


def test_missing_weights_raise_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_reference_model(tmp_path)


SMOKE = TrainConfig(epochs=8, limit=40, threads=1, net={"channels": [8, 8, 8]})


def test_training_smoke_run_writes_weights_that_load_back(tmp_path: Path) -> None:
    config = SMOKE
    result = train_reference_model(config)
    assert result.steps == 8 and result.train_items == 40 and result.test_items == 40
    assert all(np.isfinite(result.step_losses))
    assert result.step_losses[-1] < result.step_losses[0]
    assert 0.0 <= result.test_accuracy <= 1.0
    weights = save_weights(result, tmp_path)
    assert weights == tmp_path / WEIGHTS_FILE
    with pytest.raises(InputError, match="overwrite"):
        save_weights(result, tmp_path)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta["training"]["seed"] == config.seed and meta["evaluation"]["items"] == 40
    module, tokenizer, _, pre = load_reference_model(tmp_path)
    images = normalise(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), pre["mean"], pre["std"])
    tokens = pad_questions(tokenizer, ["what color is the shape?"])
    with torch.no_grad():
        torch.testing.assert_close(module(images, tokens), result.model(images, tokens))


def test_distractors_land_on_the_background_only() -> None:
    images = np.full((6, 32, 32, 3), 240, dtype=np.uint8)
    images[:, 4:12, 4:12] = (0, 0, 255)
    background = background_masks(images)
    assert background.shape == (6, 32, 32) and not background[:, 4:12, 4:12].any()
    out = add_distractors(images, background, np.random.default_rng(0), 1.0)
    changed = (out != images).any(axis=3)
    assert changed.any(axis=(1, 2)).all()  # probability 1: every image got squares
    assert not changed[:, 3:13, 3:13].any()  # never the shape nor its 1-pixel margin
    colours = {tuple(int(v) for v in out[i, r, c]) for i, r, c in np.argwhere(changed)}
    assert DISTRACTOR_GREY in colours and len(colours) > 1
    again = add_distractors(images, background, np.random.default_rng(0), 1.0)
    np.testing.assert_array_equal(out, again)
    unchanged = add_distractors(images, background, np.random.default_rng(0), 0.0)
    np.testing.assert_array_equal(unchanged, images)
    with pytest.raises(InputError, match="distractors must be in"):
        TrainConfig(distractors=1.5)
    with pytest.raises(InputError, match="label_smoothing must be in"):
        TrainConfig(label_smoothing=1.0)


def test_training_is_reproducible_from_the_seed() -> None:
    first = train_reference_model(SMOKE).model.state_dict()
    second = train_reference_model(SMOKE).model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_train_command_refuses_to_overwrite_and_prints_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blackbox_vqa.cli.app import main

    out = tmp_path / "weights"
    args = ["train", "--epochs", "1", "--limit", "20", "--threads", "1", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    assert "test accuracy:" in capsys.readouterr().out
    assert (out / WEIGHTS_FILE).is_file() and (out / METADATA_FILE).is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--force" in capsys.readouterr().err
