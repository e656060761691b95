"""Evaluating single items: records, skipped items, model failures, order independence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blackbox_vqa.datasets import Item
from blackbox_vqa.errors import ModelOutputError
from blackbox_vqa.evaluation.pos import PatternTagger
from blackbox_vqa.evaluation.runner import EvalConfig, ItemEvaluator, item_rng, run_items
from blackbox_vqa.evaluation.runstore import ItemRecord
from blackbox_vqa.evaluation.summary import summarize
from blackbox_vqa.explainers.registry import MethodSettings
from vqa_fixture import square_image, square_mask

from toys import BrightnessModel, nan_model

CONFIG = EvalConfig(model="toys:brightness_model", methods=("occlusion", "guided-bp"),
                    options=MethodSettings(grid=4), seed=5)


@pytest.fixture
def square_item(tmp_path: Path) -> Item:
    image, hat = tmp_path / "COCO_x_1.png", tmp_path / "1_1.png"
    Image.fromarray(square_image()).save(image)
    Image.fromarray(square_mask()).save(hat)
    return Item(key="1", question="is it bright?", image=str(image), answer="bright",
                answers=("bright",) * 3 + ("dark",), maps=(str(hat),), map_kind="files")


def test_an_item_record_holds_answer_maps_and_correlations(square_item: Item) -> None:
    evaluator = ItemEvaluator(BrightnessModel(), CONFIG)
    assert list(evaluator.methods) == ["occlusion"]
    assert "offers no gradients" in evaluator.unavailable["guided-bp"]
    record = evaluator.evaluate(square_item)
    meta = record.meta
    brightness = square_image().mean() / 255
    assert meta["status"] == "done" and meta["answer"] == "bright"
    assert meta["probability"] == pytest.approx(brightness)
    assert meta["margin"] == pytest.approx(2 * brightness - 1)
    assert meta["entropy"] == pytest.approx(
        -(brightness * np.log(brightness) + (1 - brightness) * np.log(1 - brightness)))
    assert meta["correct"] is True and meta["vqa_accuracy"] == 1.0
    assert meta["human"]["maps"] == 1
    assert meta["human"]["correlations"]["occlusion"] == [pytest.approx(1.0)]
    assert meta["methods"]["occlusion"]["words"] == ["is", "it", "bright"]
    assert set(record.arrays) == {"occlusion.image", "occlusion.words"}
    assert record.arrays["occlusion.image"].shape == (4, 4)
    assert set(meta["seconds"]) == {"predict", "occlusion", "total"}


def test_the_occlusion_fill_is_the_configured_baseline(square_item: Item) -> None:
    from dataclasses import replace

    from blackbox_vqa.explainers.occlusion import Occlusion

    config = replace(CONFIG, options=MethodSettings(grid=4, baseline="black"))
    record = ItemEvaluator(BrightnessModel(), config).evaluate(square_item)
    expected = Occlusion(BrightnessModel(), grid=4, baseline="black").explain(
        square_image(), square_item.question)
    np.testing.assert_array_equal(record.arrays["occlusion.image"], expected.image_map)
    # A black fill darkens every cell: each importance is the cell's share of brightness.
    assert (record.arrays["occlusion.image"] > 0).all()


def test_items_the_model_cannot_take_are_skipped_with_the_reason(
    square_item: Item, tmp_path: Path
) -> None:
    evaluator = ItemEvaluator(BrightnessModel(), CONFIG)
    no_words = evaluator.evaluate(Item(key="2", question="?!", image=square_item.image,
                                       answer=None))
    assert no_words.meta["status"] == "skipped" and "contains no words" in no_words.meta["reason"]
    missing = evaluator.evaluate(Item(key="3", question="is it?", image=str(tmp_path / "x.png"),
                                      answer=None))
    assert missing.meta["status"] == "skipped" and "image file not found" in missing.meta["reason"]
    assert missing.arrays == {}


def test_a_model_failure_stops_the_run(square_item: Item) -> None:
    evaluator = ItemEvaluator(nan_model(), CONFIG)
    with pytest.raises(ModelOutputError, match="NaN"):
        evaluator.evaluate(square_item)


def test_results_do_not_depend_on_item_order(square_item: Item) -> None:
    other = Item(key="9", question="is it not bright?", image=square_item.image, answer="dark",
                 answers=("dark",), maps=square_item.maps, map_kind="files")
    forward: list[ItemRecord] = []
    backward: list[ItemRecord] = []
    evaluator = ItemEvaluator(BrightnessModel(), CONFIG)
    run_items([square_item, other], CONFIG, forward.append, evaluator=evaluator)
    run_items([other, square_item], CONFIG, backward.append, evaluator=evaluator)
    by_key = {r.key: r for r in backward}
    for record in forward:
        twin = by_key[record.key]
        drop = {"seconds"}
        assert {k: v for k, v in record.meta.items() if k not in drop} == {
            k: v for k, v in twin.meta.items() if k not in drop}
    assert np.array_equal(item_rng(5, "9").random(3), item_rng(5, "9").random(3))
    assert not np.array_equal(item_rng(5, "9").random(3), item_rng(5, "1").random(3))
    assert not np.array_equal(item_rng(5, "9").random(3), item_rng(6, "9").random(3))


def test_summary_counts_skipped_items_and_reports_unavailable_methods(
    square_item: Item,
) -> None:
    evaluator = ItemEvaluator(BrightnessModel(), CONFIG)
    records = [evaluator.evaluate(square_item),
               evaluator.evaluate(Item(key="2", question="?", image=square_item.image,
                                       answer=None))]
    settings = {"model": "m", "dataset": {"dataset": "vqa"}, "methods": ["occlusion",
                "guided-bp"], "seed": 5}
    results = summarize(records, settings=settings, dataset_skipped={"no image": 4},
                        tagger=PatternTagger(), folds=5)
    assert results["items"]["planned"] == 2 and results["items"]["evaluated"] == 1
    assert list(results["items"]["skipped_in_run"].values()) == [1]
    assert results["items"]["skipped_in_dataset"] == {"no image": 4}
    assert results["methods"]["guided-bp"]["available"] is False
    assert results["human_attention"]["rows"]["occlusion"]["mean"] == pytest.approx(1.0)
    assert "guided-bp" not in results["human_attention"]["rows"]
