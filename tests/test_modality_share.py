"""MM-SHAP checked against exact Shapley values of hand-made games.

The toy models read a 4 x 4 white image cut into a 2 x 2 grid (a cell is present when it
is still white, absent when filled with black) and a two-word question ``"red shape"``
(a word is present when it is still in the question): six players, 64 coalitions, 720
permutations. For a polynomial game the Shapley values are known by hand (a product of
``k`` players splits its coefficient equally among them); for a sigmoid game they come
from the subset formula over all 64 coalitions.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from blackbox_vqa.errors import InputError, ModelOutputError
from blackbox_vqa.explainers.modality_share import ModalityShare, modality_share_attribution
from blackbox_vqa.explainers.shapley import (
    exact_shapley,
    modality_share,
    modality_share_evaluations,
    permutation_marginals,
    permutation_units,
    prefix_masks,
    t_shap_standard_error,
    unit_estimate,
)
from blackbox_vqa.text import drop_word, keep_words, split_words

IMAGE = np.full((4, 4, 3), 255, dtype=np.uint8)
QUESTION = "red shape?"
BLACK = "0,0,0"
Game = Callable[[np.ndarray], float]


def players_of(image: np.ndarray, question: str) -> np.ndarray:
    """Membership ``bool [6]`` read back from a model input: cells (row-major), words."""
    pixels = np.asarray(image, dtype=np.float64)
    cells = [pixels[r:r + 2, c:c + 2].mean() == 255.0 for r in (0, 2) for c in (0, 2)]
    words = split_words(question)
    return np.array([*cells, "red" in words, "shape" in words], dtype=bool)


class GameModel:
    """Protocol object: ``p(yes) = game(players present)``, ``p(no) = 1 - p(yes)``."""

    name = "game"

    def __init__(self, game: Game) -> None:
        self.answers = ["yes", "no"]
        self.game = game
        self.calls: list[int] = []
        self.seen: list[tuple[bytes, str]] = []

    def answer_probs(self, image: Any, question: str) -> np.ndarray:
        return self.answer_probs_batch([image], [question])[0]

    def answer_probs_batch(self, images: Sequence[Any], questions: Sequence[str]) -> np.ndarray:
        self.calls.append(len(images))
        out = []
        for image, question in zip(images, questions, strict=True):
            self.seen.append((np.asarray(image, dtype=np.float32).tobytes(), question))
            p = self.game(players_of(image, question))
            out.append([p, 1.0 - p])
        return np.asarray(out, dtype=np.float64)


def polynomial(x: np.ndarray) -> float:
    m0, m1, m2, m3, red, shape = (float(v) for v in x)
    return (0.1 + 0.2 * m0 + 0.1 * m1 + 0.05 * m2 + 0.15 * red + 0.05 * shape
            + 0.12 * m0 * m1 * red + 0.06 * m3 * shape)


# By hand: linear terms go to their player; 0.12 m0 m1 red splits 0.04 each; 0.06 m3 shape
# splits 0.03 each.
POLYNOMIAL_PHI = np.array([0.24, 0.14, 0.05, 0.03, 0.19, 0.08])


def sigmoid(x: np.ndarray) -> float:
    m0, m1, m2, m3, red, shape = (float(v) for v in x)
    z = -1 + 2 * m0 + m1 - 0.5 * m2 + 0.7 * m3 + 1.5 * red - shape + 2 * m0 * red * shape \
        - 1.2 * m1 * m2 * shape
    return 1.0 / (1.0 + math.exp(-z))


def pairs(x: np.ndarray) -> float:
    """Single players and pairs only: antithetic sampling is exact on it."""
    return float(0.1 + 0.3 * x[0] * x[4] + 0.2 * x[1] + 0.1 * x[5] * x[2])


PAIRS_PHI = np.array([0.15, 0.2, 0.05, 0.0, 0.15, 0.05])


def pairs_model() -> GameModel:
    """Factory spec ``test_modality_share:pairs_model`` for the CLI tests."""
    return GameModel(pairs)


def image_blind_model() -> GameModel:
    """Reads only the words."""
    return GameModel(lambda x: 0.2 + 0.3 * x[4] + 0.4 * x[4] * x[5])


def explainer(game: Game, **options: Any) -> tuple[ModalityShare, GameModel]:
    model = GameModel(game)
    return ModalityShare(model, grid=2, baseline=BLACK, **options), model


def test_keep_words_drops_like_word_occlusion() -> None:
    question = "what color is the shape?"
    for i in range(5):
        keep = [j != i for j in range(5)]
        assert keep_words(question, keep) == drop_word(question, i)
    assert keep_words(question, [True] * 5) == question
    assert keep_words(question, [False] * 5) == "?"
    assert keep_words(question, [False, True, False, True, False]) == "color the?"
    with pytest.raises(InputError, match="one flag per word"):
        keep_words(question, [True])


def test_exact_shapley_equals_the_hand_values() -> None:
    np.testing.assert_allclose(exact_shapley(polynomial, 6), POLYNOMIAL_PHI, rtol=0, atol=1e-15)


def test_exhaustive_permutations_equal_the_hand_values() -> None:
    shap, model = explainer(polynomial, sampling="exhaustive")
    result = shap.explain(IMAGE, QUESTION)
    assert result.answer == "yes" and result.words == ("red", "shape")
    np.testing.assert_allclose(result.phi, POLYNOMIAL_PHI, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result.phi_se, np.zeros(6))
    assert result.permutations == 720 == result.units
    assert result.evaluations == 64  # every coalition once
    assert len(set(model.seen)) == len(model.seen) == 64
    assert result.t_shap == pytest.approx(0.27 / 0.73, abs=1e-12)
    assert result.v_shap == pytest.approx(0.46 / 0.73, abs=1e-12)
    assert result.t_shap_se == 0.0
    np.testing.assert_allclose(result.image_map, [[0.24, 0.14], [0.05, 0.03]], atol=1e-12)
    np.testing.assert_allclose(result.word_map, [0.19, 0.08], atol=1e-12)


def test_exhaustive_permutations_equal_the_subset_formula_on_a_nonlinear_game() -> None:
    shap, _ = explainer(sigmoid, sampling="exhaustive")
    result = shap.explain(IMAGE, QUESTION)
    exact = exact_shapley(sigmoid, 6)
    np.testing.assert_allclose(result.phi, exact, rtol=0, atol=1e-12)
    assert abs(result.efficiency_gap) < 1e-12
    assert result.value_all == pytest.approx(sigmoid(np.ones(6, dtype=bool)), abs=0)
    assert result.value_none == pytest.approx(sigmoid(np.zeros(6, dtype=bool)), abs=0)


@pytest.mark.parametrize("sampling", ["antithetic", "plain"])
def test_sampled_estimates_converge_within_their_standard_errors(sampling: str) -> None:
    exact = exact_shapley(sigmoid, 6)
    shap, model = explainer(sigmoid, sampling=sampling, permutations=400, seed=3)
    result = shap.explain(IMAGE, QUESTION)
    z = np.abs(result.phi - exact) / result.phi_se
    assert np.all(result.phi_se > 0) and np.all(z < 4.0), z
    t_exact, _ = modality_share(exact, 4)
    assert abs(result.t_shap - t_exact) < 4 * result.t_shap_se
    assert abs(result.efficiency_gap) < 1e-12  # every permutation telescopes
    assert result.evaluations <= 64 and len(set(model.seen)) == len(model.seen)
    assert result.units == (200 if sampling == "antithetic" else 400)


def test_antithetic_pairs_cancel_pairwise_interactions() -> None:
    """A game of single players and pairs: every antithetic pair gives the exact values."""
    shap, _ = explainer(pairs, permutations=4, seed=1)
    result = shap.explain(IMAGE, QUESTION)
    np.testing.assert_allclose(result.phi, PAIRS_PHI, atol=1e-15)
    np.testing.assert_allclose(result.phi_se, 0.0, atol=1e-15)


def test_reported_standard_errors_match_the_spread_over_seeds() -> None:
    """Over 300 seeds of 20 plain permutations, the spread of phi and of T-SHAP matches
    the mean reported standard error (delta method for T-SHAP)."""
    phis, ses, ts, t_ses = [], [], [], []
    for seed in range(300):
        shap, _ = explainer(sigmoid, sampling="plain", permutations=20, seed=seed)
        result = shap.explain(IMAGE, QUESTION)
        phis.append(result.phi)
        ses.append(result.phi_se)
        ts.append(result.t_shap)
        t_ses.append(result.t_shap_se)
    ratio = np.std(phis, axis=0, ddof=1) / np.mean(ses, axis=0)
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio
    t_ratio = float(np.std(ts, ddof=1) / np.mean(t_ses))
    assert 0.8 < t_ratio < 1.25, t_ratio


def test_a_model_that_ignores_the_image_has_t_shap_one() -> None:
    shap, _ = explainer(lambda x: 0.2 + 0.3 * x[4] + 0.4 * x[4] * x[5], permutations=8)
    result = shap.explain(IMAGE, QUESTION)
    assert result.t_shap == 1.0 and result.v_shap == 0.0
    np.testing.assert_array_equal(result.image_map, np.zeros((2, 2)))


def test_a_model_that_ignores_the_question_has_v_shap_one() -> None:
    shap, _ = explainer(lambda x: 0.2 + 0.3 * x[0] * x[3] + 0.1 * x[2], permutations=8)
    result = shap.explain(IMAGE, QUESTION)
    assert result.v_shap == 1.0 and result.t_shap == 0.0
    np.testing.assert_array_equal(result.word_map, np.zeros(2))


def test_a_constant_model_has_no_modality_share() -> None:
    shap, _ = explainer(lambda x: 0.5, permutations=4)
    result = shap.explain(IMAGE, QUESTION)
    assert math.isnan(result.t_shap) and math.isnan(result.v_shap)
    section = modality_share_attribution(result).section()
    assert section["t_shap"] is None and section["t_shap_se"] is None
    assert "t_shap" not in modality_share_attribution(result).stats


def test_batches_hold_whole_permutations_and_never_exceed_the_batch_size() -> None:
    shap, model = explainer(sigmoid, permutations=12, batch_size=11, seed=5)
    result = shap.explain(IMAGE, QUESTION)
    assert model.calls[0] == 2  # the whole input and the empty coalition first
    assert max(model.calls) <= 11 and sum(model.calls) == result.evaluations
    assert result.model_calls == len(model.calls)
    assert len(set(model.seen)) == len(model.seen)
    assert result.evaluations <= modality_share_evaluations(6, 12, "antithetic")


def test_small_batches_split_a_permutation() -> None:
    shap, model = explainer(sigmoid, permutations=2, batch_size=3, seed=0, sampling="plain")
    shap.explain(IMAGE, QUESTION)
    assert model.calls[0] == 2 and max(model.calls[1:]) <= 3


def test_the_same_seed_gives_the_same_result_and_another_seed_another() -> None:
    first = explainer(sigmoid, permutations=6, seed=11)[0].explain(IMAGE, QUESTION)
    again = explainer(sigmoid, permutations=6, seed=11)[0].explain(IMAGE, QUESTION)
    other = explainer(sigmoid, permutations=6, seed=12)[0].explain(IMAGE, QUESTION)
    np.testing.assert_array_equal(first.phi, again.phi)
    assert not np.array_equal(first.phi, other.phi)


def test_log_probability_values() -> None:
    shap, _ = explainer(polynomial, sampling="exhaustive", score="log-probability")
    result = shap.explain(IMAGE, QUESTION)
    np.testing.assert_allclose(result.phi, exact_shapley(lambda x: math.log(polynomial(x)), 6),
                               atol=1e-12)


def test_explaining_another_answer() -> None:
    shap, _ = explainer(polynomial, sampling="exhaustive")
    result = shap.explain(IMAGE, QUESTION, answer="no")
    assert result.answer == "no" and result.predicted_index == 0
    np.testing.assert_allclose(result.phi, -POLYNOMIAL_PHI, atol=1e-12)
    with pytest.raises(InputError, match="not one of the model's answers"):
        shap.explain(IMAGE, QUESTION, answer="maybe")


def test_pure_functions() -> None:
    order = np.array([2, 0, 1])
    np.testing.assert_array_equal(permutation_marginals(order, np.array([0., 1., 3., 6.])),
                                  [2., 3., 1.])
    mean, se = unit_estimate(np.array([[1.0, 2.0], [3.0, 2.0]]))
    np.testing.assert_array_equal(mean, [2.0, 2.0])
    np.testing.assert_allclose(se, [1.0, 0.0])
    assert np.isnan(unit_estimate(np.array([[1.0, 2.0]]))[1]).all()
    assert modality_share(np.array([0.3, -0.1, 0.2, -0.4]), 2) == pytest.approx((0.6, 0.4))
    # T = |w| / (|w| + |c|) with one cell and one word: T's gradient at (c, w) = (1, 1) is
    # (-1/4, +1/4), so the delta s.e. is the s.e. of (w - c) / 4.
    units = np.array([[1.0, 1.2], [0.8, 1.0], [1.2, 0.8], [1.0, 1.0]])
    expected = np.std((units[:, 1] - units[:, 0]) / 4, ddof=1) / 2
    phi = units.mean(axis=0)
    assert phi[0] == pytest.approx(1.0) and phi[1] == pytest.approx(1.0)
    assert t_shap_standard_error(units, 1) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(t_shap_standard_error(units[:1], 1))
    assert prefix_masks(np.array([2, 0, 1])) == [0b000, 0b100, 0b101, 0b111]
    units = list(permutation_units(4, 6, "antithetic", 0))
    assert len(units) == 3 and all(np.array_equal(b, a[::-1]) for a, b in units)
    assert len(list(permutation_units(4, 6, "plain", 0))) == 6
    assert len(list(permutation_units(4, 1, "exhaustive", 0))) == 24
    assert modality_share_evaluations(22, 32, "antithetic") == 2 + 32 * 21
    assert modality_share_evaluations(6, 100, "plain") == 64
    assert modality_share_evaluations(6, 1, "exhaustive") == 64


@pytest.mark.parametrize(("options", "message"), [
    ({"grid": 0}, "grid must be a positive integer, got 0"),
    ({"permutations": 0}, "permutations must be a positive integer, got 0"),
    ({"permutations": 3}, "permutations must be even"),
    ({"sampling": "sobol"}, "sampling must be one of"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"baseline": "pink"}, "baseline must be one of"),
    ({"batch_size": 0}, "batch size must be"),
    ({"score": "logit"}, "score must be one of"),
])
def test_bad_settings_name_the_parameter(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        ModalityShare(GameModel(polynomial), **options)


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="cannot be split into a 8-cell grid"):
        ModalityShare(GameModel(polynomial), grid=8).explain(IMAGE, QUESTION)
    with pytest.raises(InputError, match="at most 8 players"):
        ModalityShare(GameModel(polynomial), grid=2, sampling="exhaustive").explain(
            IMAGE, "red shape with many words?")


def test_a_bad_model_output_is_a_model_error() -> None:
    shap, _ = explainer(lambda x: float("nan") if not x.all() else 0.5, permutations=2)
    with pytest.raises(ModelOutputError, match="NaN"):
        shap.explain(IMAGE, QUESTION)


def test_progress_counts_permutations() -> None:
    seen: list[tuple[int, int]] = []
    shap, _ = explainer(sigmoid, permutations=8, batch_size=10, progress=lambda d, t:
                        seen.append((d, t)))
    shap.explain(IMAGE, QUESTION)
    assert seen[-1] == (8, 8) and all(t == 8 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_every_coalition_of_the_exhaustive_walk_is_a_real_input() -> None:
    """The 64 inputs the model saw are exactly the 64 coalitions, cells filled with the
    baseline and words dropped."""
    shap, model = explainer(polynomial, sampling="exhaustive")
    shap.explain(IMAGE, QUESTION)
    found = {tuple(players_of(np.frombuffer(raw, dtype=np.float32).reshape(4, 4, 3), q))
             for raw, q in model.seen}
    assert found == set(itertools.product([False, True], repeat=6))
    questions = {q for _, q in model.seen}
    assert questions == {"red shape?", "red?", "shape?", "?"}


def test_the_evaluation_table_averages_over_items_and_counts_undefined_ones() -> None:
    from blackbox_vqa.evaluation.runstore import ItemRecord
    from blackbox_vqa.evaluation.summary import markdown_modality, modality_table

    def record(key: str, stats: dict[str, float]) -> ItemRecord:
        return ItemRecord(key, {"methods": {"mm-shap": {"stats": stats},
                                            "occlusion": {"stats": {"evaluations": 9.0}}}})

    records = [
        record("a", {"t_shap": 0.2, "v_shap": 0.8, "t_shap_se": 0.01, "evaluations": 100.0,
                     "t_shap_defined": 1.0}),
        record("b", {"t_shap": 0.6, "v_shap": 0.4, "t_shap_se": 0.03, "evaluations": 120.0,
                     "t_shap_defined": 1.0}),
        record("c", {"evaluations": 80.0, "t_shap_defined": 0.0}),  # every phi was 0
    ]
    table = modality_table(records, ["occlusion", "mm-shap"])
    assert list(table["methods"]) == ["mm-shap"]  # occlusion reports no shares
    entry = table["methods"]["mm-shap"]
    assert entry["t_shap"] == {"mean": pytest.approx(0.4), "sem": pytest.approx(0.2),
                               "n": 2, "undefined": 1}
    assert entry["v_shap"]["mean"] == pytest.approx(0.6)
    assert entry["t_shap_se"]["mean"] == pytest.approx(0.02)
    assert entry["evaluations"]["mean"] == pytest.approx(100.0) and entry["evaluations"]["n"] == 3
    lines = markdown_modality(table)
    assert "| mm-shap | 0.400 ± 0.200 | 0.600 ± 0.200 | 2 | 1 | 0.020 | 100 |" in lines
    assert markdown_modality(modality_table(records, ["occlusion"])) == []


def test_the_section_reads_back_and_the_report_states_the_shares() -> None:
    from blackbox_vqa.explain import explain
    from blackbox_vqa.explainers.registry import method_keys
    from blackbox_vqa.explanation import Explanation
    from blackbox_vqa.report.views import model_view

    found = explain(GameModel(pairs), IMAGE, QUESTION, methods="mm-shap", shap_grid=2,
                    shap_permutations=4, baseline=BLACK)
    doc = found.to_dict()
    np.testing.assert_allclose(doc["mm_shap"]["words"], PAIRS_PHI[4:], atol=1e-15)
    back = Explanation.from_dict(json.loads(json.dumps(doc, allow_nan=False)), method_keys())
    attribution = back.attribution("mm-shap")
    assert attribution is not None and attribution.signed
    assert attribution.extras["t_shap"] == pytest.approx(1 / 3, abs=1e-15)
    facts = dict(model_view(back).facts)
    assert facts["mm-shap: T-SHAP (question) / V-SHAP (image)"] == \
        "0.333 ± 0.000 / 0.667 (4 permutations, " \
        f"{doc['mm_shap']['evaluations']} model inputs)"
