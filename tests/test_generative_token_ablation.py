"""Token occlusion on the generative VLMs of hf: (issue 22) with tiny random-weight models of
all four families (genvlm_toys): every cell's score against the model's own forward pass
with the attention mask zeroed at the cell's image tokens and the unablated position ids,
batching and cache reuse changing nothing, the lattices, the CLI and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli

pytest.importorskip("transformers")

import torch

from blackbox_vqa.adapters.capabilities import SupportsTokenAblation
from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.adapters.hf.generative_tokens import cell_batches
from blackbox_vqa.errors import NotSupportedError
from blackbox_vqa.explainers.token_occlusion import TokenOcclusion, cell_tokens
from genvlm_toys import build, image

FAMILIES = ("llava", "qwen2vl", "idefics3", "paligemma")
QUESTION = "what color is the shape"
#: the toys' lattices for a square image: CLIP / SigLIP 32 px at patch 8; Qwen2-VL 32 px,
#: patch 8, merge 2; Idefics3 one 32 px tile, patch 8, pixel shuffle 2
LATTICES = {"llava": (4, 4), "qwen2vl": (2, 2), "idefics3": (2, 2), "paligemma": (4, 4)}
TOLERANCE = 1e-5  # log-probability


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genvlm_tokens")
    return {family: build(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def adapters(folders: dict[str, Path]) -> dict[str, GenerativeAdapter]:
    return {f: GenerativeAdapter.from_pretrained(p, max_tokens=3, device="cpu", batch_size=4)
            for f, p in folders.items()}


def direct_logliks(adapter: GenerativeAdapter, pixels: np.ndarray, question: str,
                   masked: list[list[int]]) -> list[float]:
    """log p(answer | input) straight from the model's forward (``...ForConditionalGeneration``
    with its own pixel inputs), once per entry of ``masked``: the prompt plus the answer
    with the attention mask 0 at those sequence positions, every other input as the
    unablated one's (Qwen2-VL's M-RoPE ids from ``get_rope_index`` over the full mask)."""
    model, answer = adapter.module, list(adapter.answer_ids)
    encoded = adapter.encode([pixels], [question])
    ids = encoded.pop("input_ids")
    encoded.pop("attention_mask")
    n = ids.shape[1]
    full = torch.cat([ids, torch.tensor([answer])], dim=1)
    grow = torch.zeros((1, len(answer)), dtype=ids.dtype)
    if "mm_token_type_ids" in encoded:
        encoded["mm_token_type_ids"] = torch.cat([encoded["mm_token_type_ids"], grow], dim=1)
    if "token_type_ids" in encoded:  # PaliGemma: prefix 0, answer 1
        encoded["token_type_ids"] = torch.cat([torch.zeros_like(ids), grow + 1], dim=1)
    positions = None
    if "image_grid_thw" in encoded:
        positions, _ = model.model.get_rope_index(
            full, encoded["mm_token_type_ids"], image_grid_thw=encoded["image_grid_thw"],
            attention_mask=torch.ones_like(full))
    found = []
    for where in masked:
        mask = torch.ones_like(full)
        mask[0, where] = 0
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=mask, position_ids=positions,
                           **encoded).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        found.append(sum(float(logp[n - 1 + i, t]) for i, t in enumerate(answer)))
    return found


def image_positions(adapter: GenerativeAdapter, pixels: np.ndarray) -> list[int]:
    """Sequence positions of the prompt's image tokens, in order."""
    ids = adapter.encode([pixels], [QUESTION])["input_ids"][0]
    return [int(i) for i in (ids == adapter.module.config.image_token_id).nonzero()[:, 0]]


def test_cell_batches_sort_by_first_position() -> None:
    assert cell_batches([5, 2, 9, 2, 7], 2) == [[1, 3], [0, 4], [2]]
    assert cell_batches([], 3) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_every_cell_equals_the_direct_masked_forward(
    family: str, adapters: dict[str, GenerativeAdapter]
) -> None:
    adapter = adapters[family]
    assert isinstance(adapter, SupportsTokenAblation)
    pixels = image(3, 40)
    rows, cols = adapter.image_token_grid(pixels)
    assert (rows, cols) == LATTICES[family]
    cells = [*cell_tokens(rows, cols, 2), [(rows - 1, cols - 1)], [(0, 0), (rows - 1, 0)]]
    got = adapter.token_ablation_scores(pixels, QUESTION, cells)
    assert got.shape == (1 + len(cells), 2) and got.dtype == np.float64
    where = image_positions(adapter, pixels)
    skipped = len(where) - rows * cols  # LLaVA "full": the class token first
    masked = [[]] + [[where[skipped + r * cols + c] for r, c in cell] for cell in cells]
    expected = direct_logliks(adapter, pixels, QUESTION, masked)
    np.testing.assert_allclose(np.log(got[:, 0]), expected, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(got[:, 1], 1.0 - got[:, 0], atol=1e-12)
    # the original's row is the adapter's plain score
    assert np.log(got[0, 0]) == pytest.approx(adapter.sequence_logprob(pixels, QUESTION),
                                              abs=TOLERANCE)
    assert np.abs(np.log(got[1:, 0]) - np.log(got[0, 0])).max() > 1e-3  # not flat


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_size_and_cache_reuse_change_nothing(
    family: str, folders: dict[str, Path], adapters: dict[str, GenerativeAdapter]
) -> None:
    pixels = image(5, 40)
    rows, cols = LATTICES[family]
    # cells out of position order, and overlapping ones, so batches start at several places
    cells = [[(rows - 1, cols - 1)], [(0, 0)], *cell_tokens(rows, cols, 2), [(0, cols - 1)]]
    reference = adapters[family]
    answer = reference.answers[0]
    plain = GenerativeAdapter.from_pretrained(folders[family], device="cpu", answer=answer,
                                              batch_size=1, reuse=False)
    expected = plain.token_ablation_scores(pixels, QUESTION, cells)
    for size in (1, 2, 3, len(cells) + 1):
        adapter = GenerativeAdapter.from_pretrained(folders[family], device="cpu",
                                                    answer=answer, batch_size=size)
        got = adapter.token_ablation_scores(pixels, QUESTION, cells)
        np.testing.assert_allclose(np.log(got[:, 0]), np.log(expected[:, 0]),
                                   atol=TOLERANCE, rtol=0)


def test_non_square_qwen2vl_lattice_and_cells(adapters: dict[str, GenerativeAdapter]) -> None:
    """A 40 x 80 image becomes 16 x 32 pixels for the toy Qwen2-VL (2 x 4 patches of 8),
    merged 2 x 2 into a 1 x 2 lattice: on a 2 x 2 grid, both cells of a column hold that
    column's one token, and each cell's score is the direct forward with it masked."""
    adapter = adapters["qwen2vl"]
    pixels = image(7, 40)
    pixels = np.concatenate([pixels, image(8, 40)], axis=1)
    assert pixels.shape == (40, 80, 3)
    encoded = adapter.encode([pixels], [QUESTION])
    assert encoded["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert adapter.image_token_grid(pixels) == (1, 2)
    cells = cell_tokens(1, 2, 2)
    assert cells == [[(0, 0)], [(0, 1)], [(0, 0)], [(0, 1)]]
    got = adapter.token_ablation_scores(pixels, QUESTION, cells)
    where = image_positions(adapter, pixels)
    assert len(where) == 2
    expected = direct_logliks(adapter, pixels, QUESTION,
                              [[], [where[0]], [where[1]], [where[0]], [where[1]]])
    np.testing.assert_allclose(np.log(got[:, 0]), expected, atol=TOLERANCE, rtol=0)
    assert abs(expected[1] - expected[2]) > 1e-4  # the two tokens differ


def test_pixel_shuffle_lattice_is_row_major(adapters: dict[str, GenerativeAdapter]) -> None:
    """Idefics3's connector: token ``(r, c)`` of the shuffled grid pools the patches
    ``r s .. r s + s - 1`` by ``c s .. c s + s - 1`` (here 8 x 8 patches, s = 2), checked by
    shuffling patch embeddings that hold their own (row, col)."""
    connector = adapters["idefics3"].module.model.connector
    side, s = 8, 2
    grid = torch.tensor([[(r, c) for c in range(side)] for r in range(side)],
                        dtype=torch.float32).reshape(1, side * side, 2)
    shuffled = connector.pixel_shuffle(grid, s)[0].reshape(-1, s * s, 2)
    for k, pooled in enumerate(shuffled):
        r, c = divmod(k, side // s)
        assert sorted(map(tuple, pooled.int().tolist())) == [
            (r * s + i, c * s + j) for i in range(s) for j in range(s)]


def test_explainer_explains_the_own_answer(adapters: dict[str, GenerativeAdapter]) -> None:
    adapter = adapters["llava"]
    pixels = image(3, 40)
    result = TokenOcclusion(adapter, grid=2, score="log-probability").explain(pixels, QUESTION)
    assert result.answer == adapter.own_answer and result.token_grid == (4, 4)
    scores = adapter.token_ablation_scores(pixels, QUESTION, cell_tokens(4, 4, 2))
    np.testing.assert_allclose(result.image_map.ravel(),
                               np.log(scores[0, 0]) - np.log(scores[1:, 0]), atol=1e-12)


def test_candidate_mode_original_row(folders: dict[str, Path]) -> None:
    adapter = GenerativeAdapter(*_loaded(folders["paligemma"]), candidates=["red", "blue"],
                                device="cpu")
    pixels = image(3, 40)
    got = adapter.token_ablation_scores(pixels, QUESTION, cell_tokens(4, 4, 2))
    assert got.shape == (5, len(adapter.answers))
    np.testing.assert_allclose(got[0], adapter.answer_probs_batch([pixels], [QUESTION])[0],
                               atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)


def _loaded(folder: Path) -> tuple[object, object]:
    from blackbox_vqa.adapters.hf.generative import load_generative

    return load_generative(str(folder))


def test_cli_writes_both_maps(folders: dict[str, Path], tmp_path: Path) -> None:
    picture = tmp_path / "x.png"
    Image.fromarray(image(3, 40)).save(picture)
    out = tmp_path / "run"
    code, _, err = run_cli(["explain", "-m", f"hf:{folders['llava']}", "-i", str(picture),
                            "-q", QUESTION, "--method", "token-occlusion,occlusion",
                            "--grid", "2", "--max-tokens", "3", "--threads", "1",
                            "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    tokens = doc["token_occlusion"]
    assert tokens["token_grid"] == [4, 4] and tokens["baseline"] == "attention-mask"
    assert tokens["cells"][0] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert np.asarray(tokens["image"]).shape == (2, 2)
    assert np.asarray(doc["occlusion"]["image"]).shape == (2, 2)
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], max_tokens=3, device="cpu")
    scores = adapter.token_ablation_scores(image(3, 40), QUESTION, cell_tokens(4, 4, 2))
    assert adapter.own_answer == doc["answer"]
    np.testing.assert_allclose(np.asarray(tokens["image"]).ravel(),
                               scores[0, 0] - scores[1:, 0], atol=1e-6)


def test_tiled_idefics3_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "tiled"
    shutil.copytree(folders["idefics3"], folder)
    config = folder / "processor_config.json"
    config.write_text(config.read_text().replace('"do_image_splitting": false',
                                                 '"do_image_splitting": true'))
    assert '"do_image_splitting": true' in config.read_text()
    with pytest.raises(NotSupportedError, match="do_image_splitting"):
        TokenOcclusion(GenerativeAdapter.from_pretrained(folder, device="cpu"))
    picture = tmp_path / "x.png"
    Image.fromarray(image(3, 40)).save(picture)
    out = tmp_path / "o"
    code, _, err = run_cli(["explain", "-m", f"hf:{folder}", "-i", str(picture), "-q",
                            QUESTION, "--method", "token-occlusion", "--out", str(out)])
    assert code == 2 and "do_image_splitting" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
