"""OnnxAdapter on real ONNX Runtime sessions: third-party files without metadata, options."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from blackbox_vqa.adapters.onnx.runtime import (
    OnnxAdapter,
    default_providers,
    read_answers,
    read_vocab,
)
from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.errors import InputError, ModelError, ModelLoadError
from blackbox_vqa.explainers.occlusion import Occlusion
from cli_runner import run_cli

from toys import LinearVQANet, toy_tokenizer

ANSWERS = ["red", "green", "blue"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class ThirdParty(nn.Module):
    """Someone else's model: int32 token ids, its own tensor names, optional extra output."""

    def __init__(self, two_outputs: bool = False) -> None:
        super().__init__()
        self.net = LinearVQANet(seed=5)
        self.two_outputs = two_outputs

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) \
            -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        scores = self.net(pixel_values, input_ids.long())
        if self.two_outputs:
            return scores, pixel_values.mean((2, 3))
        return scores


def _export(path: Path, module: nn.Module, outputs: list[str], *, dynamic_size: bool = False) \
        -> Path:
    axes = {"pixel_values": {0: "b"}, "input_ids": {0: "b", 1: "t"}}
    if dynamic_size:
        axes["pixel_values"] = {0: "b", 2: "h", 3: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(2, 3, 4, 4),
                                          torch.ones(2, 3, dtype=torch.int32)),
                          str(path), dynamo=False, input_names=["pixel_values", "input_ids"],
                          output_names=outputs, dynamic_axes=axes, opset_version=17)
    return path


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("onnx") / "vqa.onnx", ThirdParty(), ["scores"])


def torch_twin() -> TorchAdapter:
    module = ThirdParty()
    return TorchAdapter(module, ANSWERS, toy_tokenizer(), image_size=4, mean=MEAN, std=STD,
                        device="cpu")


def _image(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_third_party_file_with_user_options_matches_torch(third_party: Path) -> None:
    model = OnnxAdapter(third_party, answers=ANSWERS, tokenizer=toy_tokenizer(),
                        image_size=4, mean=MEAN, std=STD)
    twin = torch_twin()
    assert model.metadata is None
    assert (model.names.image, model.names.tokens, model.names.output) == (
        "pixel_values", "input_ids", "scores")
    images = [_image(k, size=8 + k) for k in range(3)]
    questions = ["what color is the shape", "is there a red circle", "how many"]
    np.testing.assert_allclose(model.answer_probs_batch(images, questions),
                               twin.answer_probs_batch(images, questions), atol=1e-6)
    expected = Occlusion(twin, grid=3).explain(images[0], questions[0])
    result = Occlusion(model, grid=3).explain(images[0], questions[0])
    np.testing.assert_allclose(result.image_map, expected.image_map, atol=1e-6)
    np.testing.assert_allclose(result.word_map, expected.word_map, atol=1e-6)


def test_inputs_are_bit_identical_to_torch_adapter(third_party: Path) -> None:
    model = OnnxAdapter(third_party, answers=ANSWERS, tokenizer=toy_tokenizer(),
                        image_size=4, mean=MEAN, std=STD)
    questions = ["what color is the shape", "how many"]
    # At the model's size: bit-identical (the same float32 multiply and add).
    images = [_image(1, size=4), _image(2, size=4).astype(np.float32)]
    feeds = model.feeds(images, questions)
    image_tensor, tokens = torch_twin().inputs(images, questions)
    assert np.array_equal(feeds["pixel_values"], image_tensor.numpy())
    assert feeds["input_ids"].dtype == np.int32
    assert np.array_equal(feeds["input_ids"], tokens.numpy())
    # Resized: NumPy's resize (torch's weights, float64 sums) against torch's float32 one,
    # within 1e-3 on the 0-255 scale (tests/test_resize.py), i.e. 1e-3 / 255 / std here.
    images = [_image(1, size=13), _image(2, size=9).astype(np.float32)]
    feeds = model.feeds(images, questions)
    image_tensor, _ = torch_twin().inputs(images, questions)
    np.testing.assert_allclose(feeds["pixel_values"], image_tensor.numpy(), rtol=0,
                               atol=1e-3 / 255 / min(STD))


def test_static_image_size_is_read_from_the_graph(third_party: Path) -> None:
    model = OnnxAdapter(third_party, answers=ANSWERS, tokenizer=toy_tokenizer())
    assert model.preprocessing.image_size == (4, 4)
    assert model.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    assert model.output == "softmax"


def test_missing_information_is_asked_for_by_option(third_party: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--answers FILE"):
        OnnxAdapter(third_party)
    with pytest.raises(InputError, match="--vocab FILE"):
        OnnxAdapter(third_party, answers=ANSWERS)
    dynamic = _export(tmp_path / "dyn.onnx", ThirdParty(), ["scores"], dynamic_size=True)
    with pytest.raises(InputError, match="--image-size"):
        OnnxAdapter(dynamic, answers=ANSWERS, tokenizer=toy_tokenizer())
    assert OnnxAdapter(dynamic, answers=ANSWERS, tokenizer=toy_tokenizer(),
                       image_size=(6, 5)).preprocessing.image_size == (6, 5)


def test_tensor_names_ambiguous_or_wrong(tmp_path: Path) -> None:
    two = _export(tmp_path / "two.onnx", ThirdParty(two_outputs=True), ["scores", "features"])
    base = {"answers": ANSWERS, "tokenizer": toy_tokenizer()}
    with pytest.raises(InputError, match="--output-name"):
        OnnxAdapter(two, **base)  # type: ignore[arg-type]
    model = OnnxAdapter(two, output_name="scores", **base)  # type: ignore[arg-type]
    assert model.answer_probs(_image(3), "how many").shape == (3,)
    with pytest.raises(InputError, match=r"--image-input 'pixels' is not an input .*"
                                         r"pixel_values, input_ids"):
        OnnxAdapter(two, image_input="pixels", output_name="scores", **base)  # type: ignore[arg-type]


def test_runtime_errors_become_model_errors(third_party: Path) -> None:
    model = OnnxAdapter(third_party, answers=ANSWERS, tokenizer=toy_tokenizer(), image_size=8)
    with pytest.raises(ModelError, match="ONNX Runtime failed"):
        model.answer_probs(_image(1), "how many")


def test_sessions_are_built_once_and_threads_are_set(third_party: Path) -> None:
    base = {"answers": ANSWERS, "tokenizer": toy_tokenizer()}
    first = OnnxAdapter(third_party, threads=1, **base)  # type: ignore[arg-type]
    second = OnnxAdapter(third_party, threads=1, **base)  # type: ignore[arg-type]
    other = OnnxAdapter(third_party, threads=2, **base)  # type: ignore[arg-type]
    assert first.session is second.session and other.session is not first.session
    assert first.session.get_session_options().intra_op_num_threads == 1
    assert other.session.get_session_options().intra_op_num_threads == 2
    expected = ["CUDAExecutionProvider", "CPUExecutionProvider"] if (
        "CUDAExecutionProvider" in ort.get_available_providers()) else ["CPUExecutionProvider"]
    assert default_providers() == expected
    assert first.providers[-1] == "CPUExecutionProvider"
    with pytest.raises(InputError, match="threads"):
        OnnxAdapter(third_party, threads=0, **base)  # type: ignore[arg-type]


def test_answer_and_vocab_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("red\n\ngreen\nblue\n")
    (tmp_path / "a.json").write_text(json.dumps(ANSWERS))
    assert read_answers(tmp_path / "a.txt") == ANSWERS == read_answers(tmp_path / "a.json")
    (tmp_path / "v.txt").write_text("what\ncolor\n")
    assert read_vocab(tmp_path / "v.txt")("what color zebra") == [2, 3, 1]
    (tmp_path / "v.json").write_text(json.dumps({"what": 7, "color": 9}))
    assert read_vocab(tmp_path / "v.json")("color what") == [9, 7]
    (tmp_path / "t.json").write_text(json.dumps(toy_tokenizer().to_dict()))
    assert read_vocab(tmp_path / "t.json").vocab == toy_tokenizer().vocab
    (tmp_path / "bad.json").write_text('{"what": "x"}')
    with pytest.raises(InputError, match="not usable"):
        read_vocab(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InputError, match="no answers"):
        read_answers(tmp_path / "empty.txt")


@pytest.fixture
def cli_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "answers.txt").write_text("\n".join(ANSWERS) + "\n")
    (tmp_path / "vocab.json").write_text(json.dumps(dict(toy_tokenizer().vocab)))
    png = tmp_path / "in.png"
    Image.fromarray(_image(7)).save(png)
    return {"answers": tmp_path / "answers.txt", "vocab": tmp_path / "vocab.json", "png": png}


def test_cli_explains_a_third_party_onnx_file(third_party: Path, cli_files: dict[str, Path],
                                              tmp_path: Path) -> None:
    out = tmp_path / "e"
    code, _, err = run_cli(["explain", "--image", str(cli_files["png"]), "-q",
                            "is there a red circle", "--model", str(third_party), "--answers",
                            str(cli_files["answers"]), "--vocab", str(cli_files["vocab"]),
                            "--image-size", "4", "--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3",
                            "--grid", "4", "--threads", "1", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    expected = Occlusion(torch_twin(), grid=4).explain(_image(7), "is there a red circle")
    assert doc["answer"] == expected.answer
    np.testing.assert_allclose(doc["occlusion"]["image"], expected.image_map, atol=1e-4)
    np.testing.assert_allclose(doc["occlusion"]["words"], expected.word_map, atol=1e-4)


@pytest.mark.parametrize(
    ("extra", "message", "exit_code"),
    [
        (["--answers", "missing.txt"], "--answers file not found", 2),
        (["--mean", "1,2"], "--mean must be three numbers", 2),
        (["--std", "0,0,0"], "std must be positive", 2),
        (["--image-size", "4x"], "--image-size must be N or HxW", 2),
        (["--output-kind", "logits"], "--output-kind must be one of", 2),
        (["--threads", "0"], "--threads must be >= 1", 2),
        (["--tokens-input", "ids"], "--tokens-input 'ids' is not an input", 2),
    ],
)
def test_cli_bad_onnx_options(third_party: Path, cli_files: dict[str, Path],
                              extra: list[str], message: str, exit_code: int,
                              tmp_path: Path) -> None:
    base = ["explain", "--image", str(cli_files["png"]), "-q", "how many", "--model",
            str(third_party), "--answers", str(cli_files["answers"]), "--vocab",
            str(cli_files["vocab"]), "--out", str(tmp_path / "x")]
    code, _, err = run_cli([*base, *extra])
    assert code == exit_code
    assert message in err and err.count("\n") == 1


def test_cli_onnx_options_are_refused_for_other_models(cli_files: dict[str, Path],
                                                      tmp_path: Path) -> None:
    code, _, err = run_cli(["explain", "--image", str(cli_files["png"]), "-q", "how many",
                            "--model", "toys:brightness_model", "--vocab", str(cli_files["vocab"]),
                            "--threads", "2", "--out", str(tmp_path / "x")])
    # --threads is a model option of every local model (torch threads here); --vocab is not.
    assert code == 2 and "--vocab: only for .onnx models" in err


def test_cli_missing_and_corrupt_onnx_files(cli_files: dict[str, Path], tmp_path: Path) -> None:
    base = ["explain", "--image", str(cli_files["png"]), "-q", "how many", "--out",
            str(tmp_path / "x")]
    code, _, err = run_cli([*base, "--model", str(tmp_path / "none.onnx")])
    assert code == 2 and "ONNX file not found" in err
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
    code, _, err = run_cli([*base, "--model", str(tmp_path / "junk.onnx")])
    assert code == 1 and "ONNX Runtime cannot load" in err and err.count("\n") == 1
    with pytest.raises(ModelLoadError):
        OnnxAdapter(tmp_path / "junk.onnx")
