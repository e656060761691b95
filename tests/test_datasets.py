"""Data sets: VQA / VQA-HAT files, easy-VQA, and the ground-truth shape maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.datasets import human_maps, normalise_answer, open_dataset
from blackbox_vqa.datasets.easyvqa import background_colour, list_easyvqa, shape_map
from blackbox_vqa.datasets.vqa import load_hat_map
from blackbox_vqa.errors import ImageError, InputError
from blackbox_vqa.images import load_image
from vqa_fixture import build_vqa_fixture, square_image


def test_vqa_files_give_usable_items_and_count_the_skipped(tmp_path: Path) -> None:
    fx = build_vqa_fixture(tmp_path)
    listing = open_dataset("vqa", questions=fx.questions, annotations=fx.annotations,
                           images=fx.images, hat=fx.hat)
    assert [item.key for item in listing.items] == ["1001", "1002"]
    assert listing.skipped == {"no image": 1, "no human map": 1, "no annotation": 1}
    first, second = listing.items
    assert first.question == "Is the square bright?"
    assert first.image == str(fx.images / "COCO_val2014_000000000001.png")
    assert second.image.endswith("COCO_val2014_000000000002.jpg")
    assert first.answer == "bright" and first.answers == ("yes",) * 2 + ("bright",) * 8
    assert first.maps == (str(fx.hat / "1001_1.png"), str(fx.hat / "1001_2.png"))
    assert first.map_kind == "files" and listing.has_maps
    assert listing.identity["hat"] == str(fx.hat.resolve())


def test_without_maps_or_annotations_fewer_items_are_skipped(tmp_path: Path) -> None:
    fx = build_vqa_fixture(tmp_path)
    listing = open_dataset("vqa", questions=fx.questions, images=fx.images)
    assert [i.key for i in listing.items] == ["1001", "1002", "1004", "1005"]
    assert listing.skipped == {"no image": 1}
    assert listing.items[0].answer is None and listing.items[0].map_kind == "none"
    assert not listing.has_maps


def test_hat_maps_are_read_as_grey_levels(tmp_path: Path) -> None:
    fx = build_vqa_fixture(tmp_path)
    listing = open_dataset("vqa", questions=fx.questions, images=fx.images, hat=fx.hat)
    item = listing.items[0]
    maps = human_maps(item, load_image(item.image))
    assert len(maps) == 2
    assert maps[0].shape == (64, 64) and maps[0].max() == 1.0
    assert maps[0][16:48, 16:32].min() == 1.0 and maps[0].sum() == 32 * 16
    assert maps[1].max() == pytest.approx(200 / 255)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.full((4, 4, 3), (30, 60, 90), dtype=np.uint8)).save(rgb)
    assert load_hat_map(rgb)[0, 0] == pytest.approx(
        round(0.299 * 30 + 0.587 * 60 + 0.114 * 90) / 255, abs=1 / 255)


def test_broken_hat_map_raises_image_error(tmp_path: Path) -> None:
    bad = tmp_path / "1_1.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="cannot read human attention map"):
        load_hat_map(bad)
    with pytest.raises(ImageError, match="not found"):
        load_hat_map(tmp_path / "2_1.png")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "--questions file not found"),
        ("{not json", "not readable JSON"),
        (json.dumps({"annotations": []}), "not in the VQA format: no 'questions' list"),
        (json.dumps({"questions": [{"question": "x"}]}), "lacks a question_id"),
    ],
)
def test_bad_question_files_are_refused(tmp_path: Path, content: str | None,
                                        message: str) -> None:
    fx = build_vqa_fixture(tmp_path)
    path = tmp_path / "q.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        open_dataset("vqa", questions=path, images=fx.images)


def test_bad_annotation_file_and_missing_folders_are_refused(tmp_path: Path) -> None:
    fx = build_vqa_fixture(tmp_path)
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(InputError, match=r"--annotations file .* no 'annotations' list"):
        open_dataset("vqa", questions=fx.questions, images=fx.images, annotations=bad)
    with pytest.raises(InputError, match="--images folder not found"):
        open_dataset("vqa", questions=fx.questions, images=tmp_path / "nowhere")
    with pytest.raises(InputError, match="--hat folder not found"):
        open_dataset("vqa", questions=fx.questions, images=fx.images, hat=tmp_path / "no")


def test_dataset_spec_errors() -> None:
    with pytest.raises(InputError, match="must be one of easyvqa:train, easyvqa:test, vqa"):
        open_dataset("coco")
    with pytest.raises(InputError, match="use easyvqa:train or easyvqa:test"):
        open_dataset("easyvqa:val")
    with pytest.raises(InputError, match="--hat only apply to --dataset vqa"):
        open_dataset("easyvqa:test", hat="x")
    with pytest.raises(InputError, match="needs --questions FILE and --images DIR"):
        open_dataset("vqa", images="x")


def test_easyvqa_test_split_lists_every_question() -> None:
    import easy_vqa

    texts, labels, _ = easy_vqa.get_test_questions()
    listing = list_easyvqa("test")
    assert len(listing.items) == len(texts) == 9673 and listing.skipped == {}
    item = listing.items[11]
    assert item.key == "q0011" and item.question == texts[11] and item.answer == labels[11]
    assert item.answers == ()  # no human answers: no VQA accuracy
    assert item.map_kind == "shape" and Path(item.image).is_file()


def test_shape_map_marks_the_non_background_pixels() -> None:
    pixels = square_image()
    pixels[0, 0] = (115, 115, 120)  # a faint speck within the tolerance stays background
    np.testing.assert_array_equal(background_colour(pixels), [115, 115, 114])
    expected = np.zeros((64, 64))
    expected[16:48, 16:32] = 1.0
    np.testing.assert_array_equal(shape_map(pixels), expected)
    np.testing.assert_array_equal(shape_map(pixels, tolerance=0)[0, 0], 1.0)


def test_easyvqa_ground_truth_map_covers_the_shape() -> None:
    item = list_easyvqa("test").items[0]
    pixels = load_image(item.image)
    (mask,) = human_maps(item, pixels)
    corner = pixels[0, 0].astype(int)
    differs = np.abs(pixels.astype(int) - corner).max(axis=2) > 16
    np.testing.assert_array_equal(mask, differs.astype(float))
    assert 0.005 < mask.mean() < 0.5


def test_answers_are_normalised_for_comparison() -> None:
    assert normalise_answer("  Yes. ") == "yes"
    assert normalise_answer("Two  Dogs") == "two dogs"
