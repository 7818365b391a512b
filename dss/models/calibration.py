"""Temperature scaling (Guo et al. 2017) and the expected calibration error.

One temperature T > 0 for all classes: calibrated probabilities are softmax(logits / T). It is
fitted by minimising the mean negative log-likelihood on held-out logits (validation, or out-of-
fold with K folds); T > 1 softens an over-confident network, T < 1 sharpens an under-confident
one. Argmax, so accuracy, never changes.

"Logits" here are anything whose softmax is the prediction: raw logits, log-probabilities, or
with TTA or an ensemble the log of the averaged probabilities (``dss.models.prediction.predict_logits``). A
per-row constant does not matter. Everything is float64 on the host; results are deterministic.
"""

from __future__ import annotations

import math

import numpy as np

from dss import metrics

DEFAULT_BINS = 15
# The fitted temperature stays in [1/100, 100]: wider than any useful value, narrow enough that
# exp(logits / T) cannot overflow float64 after the max is subtracted.
TEMPERATURE_RANGE = (0.01, 100.0)
_NEWTON_STEPS = 100


def _check(logits: np.ndarray, labels: np.ndarray | None = None, what: str = "logits"
           ) -> tuple[np.ndarray, np.ndarray | None]:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty (N, classes) array, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError(f"{what} hold NaN or infinite values")
    if labels is None:
        return logits, None
    labels = np.asarray(labels)
    if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {logits.shape[0]} integer class indices, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be class indices in 0..{logits.shape[1] - 1}")
    return logits, labels.astype(np.int64)


def _softmax(scaled: np.ndarray) -> np.ndarray:
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """float64 probabilities softmax(logits / T), (N, C) rows summing to 1."""
    logits, _ = _check(logits)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _softmax(logits / float(temperature))


def ensemble_probs(member_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Mean over K members of softmax(logits_k / T): (K, N, C) -> (N, C). The temperature goes on
    each member, as it was fitted on single-model (out-of-fold) logits, before the average."""
    member_logits = np.asarray(member_logits, dtype=np.float64)
    if member_logits.ndim != 3 or member_logits.shape[0] == 0:
        raise ValueError(f"member logits must be (K, N, classes), got shape {member_logits.shape}")
    return np.mean([apply_temperature(logits, temperature) for logits in member_logits], axis=0)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T) (no clipping: the exact objective)."""
    logits, labels = _check(logits, labels)
    scaled = logits / float(temperature)
    top = scaled.max(axis=1)
    log_norm = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(labels.size), labels]))


def _slope_and_curvature(logits: np.ndarray, labels: np.ndarray, beta: float) -> tuple[float, float]:
    """First and second derivative of the mean NLL in beta = 1/T: E_p[z] - z_y and Var_p[z]
    averaged over rows (p = softmax(beta z)). The NLL is convex in beta, so the slope rises."""
    probs = _softmax(beta * logits)
    expected = (probs * logits).sum(axis=1)
    variance = (probs * logits ** 2).sum(axis=1) - expected ** 2
    slope = float(np.mean(expected - logits[np.arange(labels.size), labels]))
    return slope, float(np.mean(np.maximum(variance, 0.0)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in ``TEMPERATURE_RANGE`` that minimises the mean NLL of softmax(logits / T)
    on (``logits`` (N, C), ``labels`` (N,)). Safeguarded Newton on beta = 1/T, where the NLL is
    convex: the root of its slope, bracketed, with a bisection whenever Newton leaves the bracket.
    Never worse on these rows than T = 1 (inside the range, and checked)."""
    logits, labels = _check(logits, labels)
    low, high = 1.0 / TEMPERATURE_RANGE[1], 1.0 / TEMPERATURE_RANGE[0]
    if _slope_and_curvature(logits, labels, low)[0] >= 0.0:
        return TEMPERATURE_RANGE[1]
    if _slope_and_curvature(logits, labels, high)[0] <= 0.0:
        return TEMPERATURE_RANGE[0]
    beta = 1.0
    for _ in range(_NEWTON_STEPS):
        slope, curvature = _slope_and_curvature(logits, labels, beta)
        if slope > 0.0:
            high = beta
        else:
            low = beta
        step = slope / curvature if curvature > 0.0 else math.inf
        candidate = beta - step
        if not low < candidate < high:
            candidate = 0.5 * (low + high)
        if abs(candidate - beta) <= 1e-12 * beta or high - low <= 1e-12 * beta:
            beta = candidate
            break
        beta = candidate
    temperature = 1.0 / beta
    return temperature if nll(logits, labels, temperature) <= nll(logits, labels, 1.0) else 1.0


def calibrated_log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """The log loss (``metrics.log_loss``) of softmax(logits / T) at the temperature fitted on
    these same rows: what temperature scaling would make of these predictions."""
    return metrics.log_loss(apply_temperature(logits, fit_temperature(logits, labels)), labels)


def reliability(probs: np.ndarray, labels: np.ndarray, num_bins: int = DEFAULT_BINS) -> dict:
    """Reliability-diagram data over equal-width bins of the top-class confidence, bin i holding
    confidences in (i/num_bins, (i+1)/num_bins]: arrays ``lower``, ``upper``, ``count`` (int64),
    ``confidence`` (mean top probability) and ``accuracy`` (share correct), NaN in empty bins."""
    probs, labels = _check(probs, labels, "probs")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="left")     # (N,) bin of each row
    count = np.bincount(index, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=num_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=num_bins) / count
    return {"lower": edges[:-1], "upper": edges[1:], "count": count.astype(np.int64),
            "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = DEFAULT_BINS) -> float:
    """ECE: sum over bins of (share of rows in the bin) x |accuracy - mean confidence| (0 = calibrated)."""
    bins = reliability(probs, labels, num_bins)
    filled = bins["count"] > 0
    weights = bins["count"][filled] / bins["count"].sum()
    return float(np.sum(weights * np.abs(bins["accuracy"][filled] - bins["confidence"][filled])))


def summary(logits: np.ndarray, labels: np.ndarray, temperature: float, num_bins: int = DEFAULT_BINS) -> dict:
    """Before/after numbers for metrics.json: temperature, log loss (``metrics.log_loss``, clipped as
    the competition scores) and ECE at T = 1 and at T."""
    before, after = apply_temperature(logits, 1.0), apply_temperature(logits, temperature)
    return {"temperature": float(temperature),
            "logloss_before": metrics.log_loss(before, labels), "logloss_after": metrics.log_loss(after, labels),
            "ece_before": expected_calibration_error(before, labels, num_bins),
            "ece_after": expected_calibration_error(after, labels, num_bins)}
