import math

import numpy as np
import pytest
from scipy import stats

from vqa2cli import metrics


def test_monotone_nonlinear_predictions_rank_perfectly_and_fit_closely():
    pred = np.linspace(0, 1, 40)
    # MOS saturating at both ends of the prediction range (the case the logistic exists for):
    # rank metrics are exactly 1, raw Pearson is not
    mos = 5 + 90 / (1 + np.exp(-(pred - 0.5) / 0.08))
    result = metrics.score_metrics(pred, mos)
    assert result["srcc"] == pytest.approx(1.0)
    assert result["krcc"] == pytest.approx(1.0)
    assert result["fit"] == "logistic4"
    assert stats.pearsonr(pred, mos).statistic < 0.99  # the mapping matters here
    assert result["plcc"] > 0.999
    assert result["rmse"] < 1.0  # on the MOS scale


def test_logistic_fit_recovers_known_parameters():
    x = np.linspace(0, 1, 60)
    mos = 10.0 + 80.0 / (1.0 + np.exp(-(x - 0.4) / 0.08))  # b1 = 90, b2 = 10, b3 = 0.4, b4 = 0.08
    mapped, params, method, note = metrics.fit_logistic(x, mos)
    assert method == "logistic4" and note is None
    np.testing.assert_allclose(mapped, mos, atol=1e-3)
    b1, b2, b3, b4 = params
    assert (b1, b2, b3, abs(b4)) == pytest.approx((90.0, 10.0, 0.4, 0.08), rel=1e-3)


def test_rank_correlations_by_hand():
    # ranks 1..5 against 2, 1, 4, 3, 5: d = (-1, 1, -1, 1, 0), rho = 1 - 6 * 4 / (5 * 24) = 0.8;
    # of the 10 pairs, (1, 2) and (3, 4) are discordant: tau = (8 - 2) / 10 = 0.6
    pred, mos = [0.1, 0.2, 0.3, 0.4, 0.5], [20, 10, 40, 30, 50]
    assert metrics.srcc(pred, mos) == pytest.approx(0.8, abs=1e-12)
    assert metrics.krcc(pred, mos) == pytest.approx(0.6, abs=1e-12)
    # ties: pred (1, 2, 2, 3) against MOS (1, 2, 3, 4). Kendall tau-b: 5 concordant pairs, 0 discordant,
    # 1 pair tied in pred only: 5 / sqrt((6 - 1) * 6); Spearman on mid-ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4):
    # Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert metrics.krcc([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30), abs=1e-12)
    assert metrics.srcc([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert metrics.srcc(pred, mos[::-1]) == pytest.approx(-0.8, abs=1e-12)


def test_decreasing_predictions_fit_a_falling_logistic():
    pred = np.linspace(-3, 3, 30)  # e.g. a distortion measure: higher is worse
    mos = 100 / (1 + np.exp(pred / 0.7))
    result = metrics.score_metrics(pred, mos)
    assert result["srcc"] == pytest.approx(-1.0)
    assert result["fit"] == "logistic4"
    assert result["plcc"] > 0.99  # the mapped predictions follow MOS


def test_constant_predictions_give_nan_not_errors():
    mos = [10, 40, 70, 90, 20]
    result = metrics.score_metrics([0.5] * 5, mos)
    assert math.isnan(result["srcc"]) and math.isnan(result["plcc"]) and math.isnan(result["krcc"])
    assert result["fit"] == "none"
    # the best constant is the mean, 46: squared errors 1296 + 36 + 576 + 1936 + 676 = 4520, over 5
    assert result["rmse"] == pytest.approx(math.sqrt(904), abs=1e-12)


def test_few_videos_fall_back_to_linear_with_a_note():
    result = metrics.score_metrics([0.1, 0.5, 0.7], [20, 50, 90])
    assert result["fit"] == "linear" and "linear" in result["note"]
    # Sxy = 62/3, Sxx = 0.56/3, Syy = 7400/3: r = 62 / sqrt(0.56 * 7400) = 62 / sqrt(4144); the line leaves
    # Syy * (1 - r^2) = 46250/259 of squared error, over 3 videos
    assert result["plcc"] == pytest.approx(62 / math.sqrt(4144), abs=1e-12)
    assert result["rmse"] == pytest.approx(math.sqrt(46250 / 259 / 3), abs=1e-9)


@pytest.mark.parametrize(
    "pred, mos, message",
    [([1, 2], [1, 2, 3], "2 predictions but 3"), ([1], [1], "at least 2"), ([1, float("nan")], [1, 2], "finite")],
)
def test_bad_inputs_are_value_errors(pred, mos, message):
    with pytest.raises(ValueError, match=message):
        metrics.score_metrics(pred, mos)


@pytest.mark.parametrize(
    "predicted, truth, hit",
    [
        ("Yes, there is flicker.", "Yes.", True),
        ("yes", "Yes.", True),
        ("No.", "Yes.", False),
        ("Nothing is wrong", "No.", False),  # "nothing" is not "no"
        ("B", "B. Blur", True),
        ("(b) blur", "B", True),
        ("A. noise", "B", False),
        ("In the second half of the video.", "in the second half of the video", True),
        ("In the first half of the video.", "In the second half of the video.", False),
        ("A dog", "A dog runs", False),  # an open answer starting with "a" is not option A
    ],
)
def test_answer_matching(predicted, truth, hit):
    assert metrics.answer_matches(predicted, truth) is hit


def test_accuracy_overall_and_by_kind():
    result = metrics.accuracy(["Yes.", "No", "C", "blur"], ["Yes.", "Yes.", "C", "noise"])
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["by_kind"] == {
        "open": {"accuracy": 0.0, "n": 1},
        "option": {"accuracy": 1.0, "n": 1},
        "yes/no": {"accuracy": 0.5, "n": 2},
    }
    with pytest.raises(ValueError):
        metrics.accuracy([], [])
