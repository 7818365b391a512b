"""Temperature scaling and calibration error on synthetic logits whose true calibration is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dss import metrics
from dss.models.calibration import (TEMPERATURE_RANGE, apply_temperature, ensemble_probs, expected_calibration_error,
                             fit_temperature, nll, reliability, summary)


def calibrated_logits(num: int = 20000, classes: int = 8, scale: float = 2.0, seed: int = 0):
    """Logits z and labels drawn from softmax(z): at temperature 1 these are perfectly calibrated."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, (num, classes))
    probs = apply_temperature(logits, 1.0)
    labels = (probs.cumsum(axis=1) > rng.random((num, 1))).argmax(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fitting_recovers_a_known_temperature(true_temperature):
    logits, labels = calibrated_logits()
    # The network's logits are the calibrated ones times 1/T: dividing by T undoes it.
    fitted = fit_temperature(logits / (1.0 / true_temperature), labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)


def test_the_fit_is_the_minimum_and_never_worse_than_temperature_one():
    rng = np.random.default_rng(3)
    for trial in range(20):
        logits = rng.normal(0.0, rng.uniform(0.1, 8.0), (int(rng.integers(5, 300)), int(rng.integers(2, 9))))
        labels = rng.integers(0, logits.shape[1], logits.shape[0])
        fitted = fit_temperature(logits, labels)
        assert TEMPERATURE_RANGE[0] <= fitted <= TEMPERATURE_RANGE[1]
        best = nll(logits, labels, fitted)
        assert best <= nll(logits, labels, 1.0) + 1e-12
        if TEMPERATURE_RANGE[0] < fitted < TEMPERATURE_RANGE[1]:          # an interior minimum
            assert best <= nll(logits, labels, fitted * 1.01) + 1e-12
            assert best <= nll(logits, labels, fitted / 1.01) + 1e-12


def test_the_fit_is_deterministic_and_clamps_to_its_range():
    logits, labels = calibrated_logits(num=2000)
    assert fit_temperature(logits, labels) == fit_temperature(logits.copy(), labels.copy())
    perfect = np.eye(3)[[0, 1, 2, 0]] * 5.0                 # every row right: sharpen as far as allowed
    assert fit_temperature(perfect, np.array([0, 1, 2, 0])) == TEMPERATURE_RANGE[0]


def test_nll_and_apply_match_the_formula():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = np.array([0, 1])
    temperature = 1.7
    expected = -np.mean([math.log(math.exp(2 / 1.7) / sum(math.exp(v / 1.7) for v in (2.0, 0.0, -1.0))),
                         math.log(math.exp(0.5 / 1.7) / sum(math.exp(v / 1.7) for v in (0.5, 0.5, 3.0)))])
    assert nll(logits, labels, temperature) == pytest.approx(expected, rel=1e-12)
    probs = apply_temperature(logits, temperature)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(probs.argmax(axis=1), logits.argmax(axis=1))
    np.testing.assert_allclose(apply_temperature(logits + 100.0, temperature), probs, atol=1e-15)  # shift-free
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature(logits, 0.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_temperature(np.array([[0.0, np.inf]]), np.array([0]))


def test_ensemble_tempers_each_member_before_averaging():
    rng = np.random.default_rng(1)
    members = rng.normal(size=(3, 5, 4))
    expected = np.mean([apply_temperature(m, 2.0) for m in members], axis=0)
    np.testing.assert_allclose(ensemble_probs(members, 2.0), expected)
    np.testing.assert_allclose(ensemble_probs(members).sum(axis=1), 1.0)


def test_ece_of_calibrated_data_is_near_zero_and_of_overconfident_data_is_not():
    logits, labels = calibrated_logits()
    assert expected_calibration_error(apply_temperature(logits, 1.0), labels) < 0.015
    assert expected_calibration_error(apply_temperature(logits, 0.4), labels) > 0.1


def test_reliability_bins_by_hand():
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45], [0.6, 0.4], [0.5, 0.5]])
    labels = np.array([0, 0, 0, 1, 1])
    bins = reliability(probs, labels, num_bins=10)
    # Confidences 0.95, 0.95, 0.55, 0.6, 0.5 -> bins (0.9, 1] x2, (0.5, 0.6] x2, (0.4, 0.5] x1.
    np.testing.assert_array_equal(bins["count"], [0, 0, 0, 0, 1, 2, 0, 0, 0, 2])
    assert bins["accuracy"][9] == 0.5 and bins["confidence"][9] == pytest.approx(0.95)
    assert bins["accuracy"][5] == 0.5 and bins["confidence"][5] == pytest.approx(0.575)
    assert bins["accuracy"][4] == 0.0 and np.isnan(bins["accuracy"][0])
    expected = (2 * abs(0.5 - 0.95) + 2 * abs(0.5 - 0.575) + 1 * abs(0.0 - 0.5)) / 5
    assert expected_calibration_error(probs, labels, num_bins=10) == pytest.approx(expected)


def test_summary_reports_before_and_after():
    logits, labels = calibrated_logits(num=5000)
    overconfident = logits * 3.0
    fitted = fit_temperature(overconfident, labels)
    report = summary(overconfident, labels, fitted)
    assert report["temperature"] == fitted
    assert report["logloss_after"] < report["logloss_before"]
    assert report["ece_after"] < report["ece_before"]
    assert report["logloss_after"] == metrics.log_loss(apply_temperature(overconfident, fitted), labels)
