"""Token occlusion (issue 22) on a tiny random ViLT: the cell -> token rule by hand, the
scores against ViLT's own pixel mask, the JSON and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blackbox_vqa.adapters.capabilities import SupportsTokenAblation
from blackbox_vqa.errors import NotSupportedError
from blackbox_vqa.explainers.token_occlusion import TokenOcclusion, cell_tokens
from cli_runner import run_cli

from hf_toys import build_vilt
from toys import BrightnessModel

QUESTION = "what color is the shape"


@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vilt(tmp_path_factory.mktemp("vilt"))


@pytest.fixture(scope="module")
def vilt(vilt_dir: Path):  # type: ignore[no-untyped-def]
    from blackbox_vqa.specs import load_model

    return load_model(f"hf:{vilt_dir}")


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_cell_tokens_by_hand() -> None:
    # 3 token rows under 2 cell rows: the middle row straddles both cells
    assert cell_tokens(3, 3, 2)[0] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert cell_tokens(3, 3, 2)[3] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # a finer grid than the lattice: 16 cells per side over 4 tokens, 4 cells per token
    cells = cell_tokens(4, 4, 16)
    assert len(cells) == 256 and cells[5 * 16 + 0] == [(1, 0)]
    assert all(len(c) == 1 for c in cells)
    assert cell_tokens(4, 4, 4) == [[(r, c)] for r in range(4) for c in range(4)]


def test_scores_equal_vilts_own_pixel_mask(vilt) -> None:  # type: ignore[no-untyped-def]
    """Ablating one interior token equals ViLT's forward pass with that patch's pixels
    masked out (the same attention mask reached through the processor's pixel mask)."""
    assert isinstance(vilt, SupportsTokenAblation)
    image = _image()
    assert vilt.image_token_grid(image) == (4, 4)
    interior = [(1, 1), (2, 3), (3, 2)]
    got = vilt.token_ablation_scores(image, QUESTION, [[rc] for rc in interior])
    plain = vilt.answer_probs_batch([image], [QUESTION])[0]
    np.testing.assert_allclose(got[0], plain, atol=1e-6)
    pixels = vilt.pixel_inputs([image.astype(np.float32)])
    text = vilt.text_inputs([QUESTION])
    for n, (r, c) in enumerate(interior):
        mask = torch.ones((1, 64, 64), dtype=torch.long)
        mask[:, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16] = 0
        with torch.inference_mode():
            logits = vilt.module(pixel_values=pixels["pixel_values"], pixel_mask=mask,
                                 **text).logits
        expected = torch.sigmoid(logits)[0].double().numpy()
        np.testing.assert_allclose(got[1 + n], expected, atol=1e-6)
        assert np.abs(got[1 + n] - plain).max() > 1e-4  # the ablation changed something


def test_map_is_the_score_drop(vilt) -> None:  # type: ignore[no-untyped-def]
    image = _image(1)
    result = TokenOcclusion(vilt, grid=2).explain(image, QUESTION)
    scores = vilt.token_ablation_scores(image, QUESTION, cell_tokens(4, 4, 2))
    a = result.answer_index
    np.testing.assert_allclose(result.image_map.ravel(), scores[0, a] - scores[1:, a],
                               atol=1e-12)
    assert result.cells[0] == ((0, 0), (0, 1), (1, 0), (1, 1))
    assert result.baseline == "attention-mask"


def test_cli_writes_the_tokens_of_each_cell(vilt_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(_image(2)).save(image)
    out = tmp_path / "run"
    code, _, err = run_cli(["explain", "-m", f"hf:{vilt_dir}", "-i", str(image), "-q",
                            QUESTION, "--method", "token-occlusion,occlusion", "--grid", "4",
                            "--out", str(out)])
    assert code == 0, err
    text = (out / "explanation.json").read_text()
    document = json.loads(text)
    assert "token_occlusion" in text
    found = _find(document, "token_occlusion")
    assert found["token_grid"] == [4, 4] and found["baseline"] == "attention-mask"
    assert found["cells"][5] == [[1, 1]]


def _find(document: object, key: str) -> dict:
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get(key), dict):
                return item[key]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError(f"no {key} section")


def test_refused_without_a_token_path(tmp_path: Path) -> None:
    with pytest.raises(NotSupportedError, match="no patch-token image path"):
        TokenOcclusion(BrightnessModel())
    image = tmp_path / "x.png"
    Image.fromarray(_image()).save(image)
    code, _, err = run_cli(["explain", "-m", "toys:brightness_model", "-i", str(image), "-q",
                            "is it bright?", "--method", "token-occlusion",
                            "--out", str(tmp_path / "o")])
    assert code == 2 and "no patch-token image path" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
