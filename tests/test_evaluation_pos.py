"""Words by part of speech: the offline tagger, grouping, and P(most important | tag)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.evaluation.pos import (
    WH_GROUP,
    group_tag,
    importance_by_tag,
    load_tagger,
    most_important_credit,
    nltk_tagger_available,
    pos_figure,
    top_tags,
)
from blackbox_vqa.report.figures import figure_png


def test_without_nltk_data_the_offline_pattern_tagger_is_used(tmp_path: Path) -> None:
    empty = [str(tmp_path)]
    assert not nltk_tagger_available(empty)
    tagger = load_tagger("auto", nltk_paths=empty)
    assert tagger.name == "textblob-pattern"
    assert tagger.tag(["what", "color", "is", "the", "shape"]) == ["WP", "NN", "VBZ", "DT", "NN"]
    assert tagger.tag(["How", "many", "dogs", "are", "there"]) == [
        "WRB", "JJ", "NNS", "VBP", "EX"]
    assert tagger.tag(["what's", "on", "the", "t-shirt"])[1:] == ["IN", "DT", "JJ"]
    assert tagger.tag([]) == []


def test_asking_for_nltk_without_its_data_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(NotSupportedError, match=r"averaged_perceptron_tagger_eng.*pattern"):
        load_tagger("nltk", nltk_paths=[str(tmp_path)])
    with pytest.raises(InputError, match="tagger must be one of auto, nltk, pattern"):
        load_tagger("spacy")


def test_wh_tags_are_grouped() -> None:
    assert [group_tag(t) for t in ("WDT", "WP", "WP$", "WRB", "NN", "JJ")] == [
        WH_GROUP, WH_GROUP, WH_GROUP, WH_GROUP, "NN", "JJ"]


def test_credit_is_shared_among_tied_maxima_and_uninformative_maps_are_none() -> None:
    np.testing.assert_array_equal(most_important_credit(np.array([0.1, 0.5, 0.2])), [0, 1, 0])
    np.testing.assert_array_equal(most_important_credit(np.array([0.5, 0.1, 0.5, 0.5])),
                                  [1 / 3, 0, 1 / 3, 1 / 3])
    assert most_important_credit(np.zeros(4)) is None
    assert most_important_credit(np.zeros(0)) is None
    np.testing.assert_array_equal(most_important_credit(np.array([-0.2])), [1.0])


def test_top_tags_are_grouped_and_sorted_by_frequency() -> None:
    tagged = [["WP", "NN", "VBZ", "DT", "NN"], ["WRB", "JJ", "NNS"], ["WDT", "NN"]]
    # equal counts are ordered by name
    assert top_tags(tagged, top=3) == [("NN", 3), (WH_GROUP, 3), ("DT", 1)]
    assert top_tags([*tagged, ["WP"]], top=2) == [(WH_GROUP, 4), ("NN", 3)]


def test_probability_by_tag_is_computed_as_by_hand() -> None:
    tagged = [["WP", "NN", "VBZ"], ["WRB", "JJ", "NN", "NN"], ["WDT", "NN"], ["WP", "NN"]]
    maps = [
        np.array([0.9, 0.1, 0.0]),  # wh-word wins
        np.array([0.0, 0.4, 0.4, 0.1]),  # JJ and first NN tie: 1/2 each
        np.array([0.3, 0.3]),  # all tied: left out
        None,  # no map: ignored
    ]
    result = importance_by_tag(tagged, maps, [WH_GROUP, "NN", "JJ", "VBZ", "DT"])
    # wh-words: 2 seen (the tied question is left out), credit 1 -> 1/2
    assert result.probability[WH_GROUP] == pytest.approx(0.5)
    # NN: 3 seen, credit 0.5 -> 1/6
    assert result.probability["NN"] == pytest.approx(1 / 6)
    assert result.probability["JJ"] == pytest.approx(0.5)
    assert result.probability["VBZ"] == 0.0
    assert result.probability["DT"] is None
    assert result.count == {WH_GROUP: 2, "NN": 3, "JJ": 1, "VBZ": 1, "DT": 0}
    # chance: wh-words 1/3 and 1/4 -> mean 7/24
    assert result.chance[WH_GROUP] == pytest.approx(7 / 24)
    assert (result.questions, result.uninformative) == (2, 1)


def test_maps_that_do_not_align_with_the_words_are_ignored() -> None:
    result = importance_by_tag([["WP", "NN"]], [np.array([1.0, 0.0, 0.0])], ["NN"])
    assert result.questions == 0 and result.count["NN"] == 0
    with pytest.raises(InputError, match="2 tagged questions but 1 word maps"):
        importance_by_tag([["NN"], ["NN"]], [None], ["NN"])


def test_pos_figure_renders_one_bar_group_per_tag() -> None:
    fig = pos_figure(["wh-words", "NN"], {"occlusion": {"wh-words": 0.6, "NN": None},
                                         "guided-bp": {"wh-words": 0.4, "NN": 0.2}},
                     {"wh-words": 0.25, "NN": None}, title="t")
    axis = fig.axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["wh-words", "NN"]
    assert [round(p.get_height(), 3) for p in axis.patches] == [0.6, 0.0, 0.4, 0.2]
    assert figure_png(fig).startswith(b"\x89PNG")
