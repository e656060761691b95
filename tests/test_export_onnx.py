"""``bbvqa export``: real ONNX and graph files, metadata, round trips, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from blackbox_vqa.adapters.onnx.runtime import OnnxAdapter
from blackbox_vqa.adapters.torch.graph import GraphAdapter, load_graph
from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.errors import ModelLoadError, NotSupportedError
from blackbox_vqa.explainers.guided_backprop import GuidedBackprop
from blackbox_vqa.explainers.occlusion import Occlusion
from blackbox_vqa.exporters.onnx import export_model, exporter_reason
from blackbox_vqa.metadata import EXPORT_SCHEMA, KEYS, ExportMetadata
from cli_runner import run_cli
from test_guided_backprop import small_vqa

from toys import LinearVQANet, toy_tokenizer

QUESTIONS = ["what color is the shape", "is there a red circle", "how many shapes"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The CNN + LSTM toy exported once by the CLI: (folder, stdout)."""
    folder = tmp_path_factory.mktemp("export") / "small"
    code, out, err = run_cli(["export", "--model", "test_guided_backprop:small_vqa", "--out",
                              str(folder)])
    assert code == 0, err
    return folder, out


def _image(seed: int, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_files_are_valid_with_dynamic_batch_and_question_length(
    exported: tuple[Path, str],
) -> None:
    folder, out = exported
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.torchscript"]
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 20
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input}
    assert dims["images"][1:] == [3, 16, 16]
    assert isinstance(dims["images"][0], str) and dims["images"][0] == dims["tokens"][0]
    assert isinstance(dims["tokens"][1], str) and dims["tokens"][1] != dims["tokens"][0]
    # The CLI printed the verification figure and the files.
    assert "max abs diff of answer probabilities" in out
    diff = float(out.split("ONNX Runtime vs PyTorch ")[1].split(",")[0])
    assert 0 <= diff <= 1e-4
    assert "model.torchscript" in out and "torchscript" in out


def test_metadata_survives_in_both_files(exported: tuple[Path, str]) -> None:
    folder, _ = exported
    source = small_vqa()
    proto = onnx.load(str(folder / "model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    _, graph_props = load_graph(folder / "model.torchscript")
    for found in (props, graph_props):
        assert set(KEYS) - {"blackbox_vqa.word_embedding_dim"} <= set(found)
        meta = ExportMetadata.from_props(found, source="test")
        assert found["blackbox_vqa.schema"] == EXPORT_SCHEMA
        assert list(meta.answers) == list(source.answers)
        assert meta.tokenizer == json.loads(json.dumps(source.tokenizer.to_dict()))
        assert meta.preprocessing == source.preprocessing
        assert meta.output == "softmax" and meta.source_model == "small-vqa"
        assert meta.graph_file == "model.torchscript" and meta.word_embedding_dim == 8
    assert json.loads(props["blackbox_vqa.inputs"]) == {
        "image": "images", "tokens": "tokens", "output": "logits"}
    onnx_model, graph_model = OnnxAdapter(folder / "model.onnx"), GraphAdapter(
        folder / "model.torchscript")
    for model in (onnx_model, graph_model):
        assert list(model.answers) == list(source.answers)
        assert model.preprocessing == source.preprocessing
        assert model.tokens("what color is the shape") == source.tokens("what color is the shape")


def test_round_trip_occlusion_maps_match_the_torch_model(exported: tuple[Path, str]) -> None:
    folder, _ = exported
    models = [small_vqa(), OnnxAdapter(folder / "model.onnx"),
              GraphAdapter(folder / "model.torchscript")]
    for seed, question in enumerate(QUESTIONS[:2]):
        image = _image(seed, size=18 + seed)  # not the model size: resizing is exercised
        results = [Occlusion(m, grid=4, batch_size=5).explain(image, question) for m in models]
        reference = results[0]
        for result in results[1:]:
            assert result.answer == reference.answer
            np.testing.assert_allclose(result.scores, reference.scores, atol=1e-4)
            np.testing.assert_allclose(result.image_map, reference.image_map, atol=1e-4)
            np.testing.assert_allclose(result.word_map, reference.word_map, atol=1e-4)
    assert np.abs(results[0].image_map).max() > 0  # maps are not trivially equal


def test_graph_gradients_equal_the_modules_and_captum(exported: tuple[Path, str]) -> None:
    from test_guided_backprop import _captum, _close, _Softmax

    folder, _ = exported
    source, graph_model = small_vqa(), GraphAdapter(folder / "model.torchscript")
    image, question = _image(9), "is there a red circle"
    for guided in (True, False):
        for _ in range(2):  # the JIT profiles the first runs: results must not change
            ours = graph_model.input_gradients(image, question, guided=guided)
            theirs = source.input_gradients(image, question, guided=guided)
            np.testing.assert_allclose(ours.image, theirs.image, rtol=1e-5, atol=1e-9)
            assert ours.words is not None and theirs.words is not None
            np.testing.assert_allclose(ours.words, theirs.words, rtol=1e-5, atol=1e-9)
    guided_result = GuidedBackprop(graph_model).explain(image, question)
    captum = _captum(_Softmax(source.module), source, image, question,
                     guided_result.answer_index)
    _close(guided_result.gradient, captum)


def test_explain_with_onnx_finds_the_graph_for_guided_bp(
    exported: tuple[Path, str], tmp_path: Path
) -> None:
    folder, _ = exported
    png = tmp_path / "in.png"
    Image.fromarray(_image(3)).save(png)
    code, out, err = run_cli(["explain", "--image", str(png), "-q", "what color is the shape",
                              "--model", str(folder / "model.onnx"), "--method", "guided-bp",
                              "--out", str(tmp_path / "e")])
    assert code == 0, err
    assert "gradients from the exported PyTorch graph" in out
    doc = json.loads((tmp_path / "e" / "explanation.json").read_text())
    assert doc["guided_backprop"]["source"] == str(folder / "model.torchscript")
    expected = GuidedBackprop(small_vqa()).explain(_image(3), "what color is the shape")
    np.testing.assert_allclose(doc["guided_backprop"]["image"], expected.image_map,
                               rtol=1e-4, atol=1e-9)


def test_bare_onnx_refuses_guided_bp_and_all_notes_it(
    exported: tuple[Path, str], tmp_path: Path
) -> None:
    folder, _ = exported
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
    png = tmp_path / "in.png"
    Image.fromarray(_image(4)).save(png)
    args = ["explain", "--image", str(png), "-q", "how many shapes", "--model",
            str(bare / "model.onnx")]
    code, _, err = run_cli([*args, "--method", "guided-bp", "--out", str(tmp_path / "g")])
    assert code == 2 and err.count("\n") == 1
    assert "needs a PyTorch graph" in err and "bbvqa export" in err and "ONNX file" in err
    code, out, err = run_cli([*args, "--method", "all", "--grid", "2",
                              "--out", str(tmp_path / "a")])
    assert code == 0, err
    doc = json.loads((tmp_path / "a" / "explanation.json").read_text())
    assert set(doc["guided_backprop"]) == {"available", "reason"}
    assert doc["guided_backprop"]["available"] is False
    assert "needs a PyTorch graph" in doc["guided_backprop"]["reason"]
    assert doc["occlusion"]["grid"] == 2 and "unavailable" in out


# -- refusals ------------------------------------------------------------------------------


class SvdNet(nn.Module):
    """A GRU question encoder and an operator ONNX has no translation for (SVD)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 4)
        self.gru = nn.GRU(4, 4, batch_first=True)
        self.linear = nn.Linear(4, 3)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        spectrum = torch.linalg.svdvals(image.mean(1)).sum(-1, keepdim=True)
        words, _ = self.gru(self.embedding(tokens))
        return self.linear(words[:, -1]) + spectrum


def svd_model() -> TorchAdapter:
    return TorchAdapter(SvdNet(), ["a", "b", "c"], toy_tokenizer(), image_size=8,
                        device="cpu")


class LengthBranchNet(LinearVQANet):
    """Python control flow on the question length: a trace freezes one branch."""

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out = super().forward(image, tokens)
        return out * 3.0 if tokens.shape[1] > 3 else out


def length_branch_model() -> TorchAdapter:
    return TorchAdapter(LengthBranchNet(), ["a", "b", "c"], toy_tokenizer(), image_size=4,
                        device="cpu")


def test_unexportable_model_gets_one_line_and_no_files(tmp_path: Path) -> None:
    out = tmp_path / "svd"
    code, _, err = run_cli(["export", "--model", "test_export_onnx:svd_model", "--out", str(out)])
    assert code == 2
    error = err.strip().splitlines()[-1]
    assert error.startswith("bbvqa: error: cannot export to ONNX:") and "svd" in error
    assert err.count("bbvqa: error") == 1 and "Traceback" not in err and "graph(" not in err
    assert not out.exists()  # not even the folder it created


def test_verification_failure_leaves_no_files(tmp_path: Path) -> None:
    adapter = length_branch_model()
    before = {k: v.clone() for k, v in adapter.module.state_dict().items()}
    adapter.module.train()
    out = tmp_path / "branch"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="verification failed") as info:
        export_model(adapter, out, graph="torchscript", onnx_exporter="torchscript",
                     samples=[(_image(1), "how many"), (_image(2), "what color is the shape")])
    assert getattr(info.value, "exit_code", None) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # no staging folder left
    assert adapter.module.training
    assert all(torch.equal(v, adapter.module.state_dict()[k]) for k, v in before.items())
    assert all(len(m._forward_hooks) == 0 for m in adapter.module.modules())


def test_cli_refusals(tmp_path: Path, exported: tuple[Path, str]) -> None:
    folder, _ = exported
    cases = [
        (["--model", "toys:brightness_model"], "only PyTorch models can be exported"),
        (["--model", "test_guided_backprop:small_vqa", "--opset", "99"], "opset"),
        (["--model", "test_guided_backprop:small_vqa", "--image", "x.png"], "pair up"),
        (["--model", "test_guided_backprop:small_vqa", "--tolerance", "0"], "tolerance"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["export", "--out", str(tmp_path / "o"), *extra])
        assert code == 2, (extra, err)
        assert message in err and err.count("\n") == 1
    code, _, err = run_cli(["export", "--model", "test_guided_backprop:small_vqa", "--out",
                            str(folder)])
    assert code == 2 and "--force" in err
    code, _, err = run_cli(["export", "--out", str(tmp_path / "o"), "--graph", "onnx"])
    assert code == 2 and "onnx" in err


def test_graph_without_metadata_is_refused(tmp_path: Path) -> None:
    module = LinearVQANet()
    traced = torch.jit.trace(module, (torch.zeros(1, 3, 4, 4), torch.ones(1, 2,
                                                                        dtype=torch.long)))
    path = tmp_path / "plain.torchscript"
    torch.jit.save(traced, str(path))
    with pytest.raises(ModelLoadError, match="no blackbox_vqa metadata"):
        GraphAdapter(path)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="cannot load exported graph"):
        GraphAdapter(tmp_path / "junk.pt2")


def test_exporter_reason_picks_the_summary_line() -> None:
    exc = RuntimeError(
        "Failed to convert.\n- step\n\n## Exception summary\n\n<class 'torch.onnx."
        "DispatchError'>: No ONNX function found for aten.svd\nmore\n"
    )
    assert exporter_reason(exc) == "No ONNX function found for aten.svd"
    assert exporter_reason(ValueError("\x1b[96mbad\x1b[0m thing\nsecond")) == "bad thing"


def test_export_refuses_a_tokenizer_it_cannot_save(tmp_path: Path) -> None:
    adapter = TorchAdapter(LinearVQANet(), ["a", "b", "c"], lambda q: [2, 3], image_size=4,
                           device="cpu")
    with pytest.raises(NotSupportedError, match="tokenizer"):
        export_model(adapter, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_non_recurrent_model_gets_a_pt2_graph(tmp_path: Path) -> None:
    adapter = TorchAdapter(LinearVQANet(seed=3), ["a", "b", "c"], toy_tokenizer(),
                           image_size=4, device="cpu", name="linear")
    result = export_model(adapter, tmp_path / "lin", samples=[
        (_image(k, size=6), q) for k, q in enumerate(QUESTIONS)])
    assert result.graph_format == "pt2" and result.graph_path.name == "model.pt2"
    assert result.onnx_max_diff <= 1e-4 and result.graph_max_diff <= 1e-4
    graph_model = GraphAdapter(result.graph_path)
    for question in QUESTIONS:
        np.testing.assert_allclose(
            graph_model.answer_probs(_image(5, size=6), question),
            adapter.answer_probs(_image(5, size=6), question), atol=1e-6)
    grads = graph_model.input_gradients(_image(5, size=6), "how many shapes")
    expected = adapter.input_gradients(_image(5, size=6), "how many shapes")
    np.testing.assert_allclose(grads.image, expected.image, rtol=1e-5, atol=1e-9)
    assert grads.words is not None and expected.words is not None
    np.testing.assert_allclose(grads.words, expected.words, rtol=1e-5, atol=1e-9)
