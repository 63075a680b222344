"""Evaluation metrics of video quality assessment, as the VQA literature computes them.

Scores: SRCC (Spearman) and KRCC (Kendall tau-b) on the raw predictions, which are rank measures and need
no mapping; PLCC (Pearson) and RMSE after mapping predictions onto the MOS scale with the 4-parameter
logistic of VQEG practice,

    f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2,

fitted by least squares. When the fit does not converge (or there are too few videos to fit 4 parameters)
the mapping falls back to a straight line and the result says so (`fit: "linear"`, `note`).

Undefined values are NaN, never an exception: constant predictions or constant MOS have no correlation.
Mismatched lengths, fewer than 2 pairs or non-finite numbers are caller errors (ValueError).

Questions: an answer matches when, case-insensitively, the yes/no of both agrees (first word), the option
letter agrees (ground truth "B", "B.", "(B) text"), or otherwise the normalised texts are equal.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np

MIN_FIT_POINTS = 5  # a 4-parameter fit needs more points than parameters


def logistic4(x, b1, b2, b3, b4):
    z = np.clip(-(np.asarray(x, dtype=np.float64) - b3) / abs(b4), -500.0, 500.0)  # no overflow warnings
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


def _pairs(pred, mos):
    pred = np.asarray(pred, dtype=np.float64).ravel()
    mos = np.asarray(mos, dtype=np.float64).ravel()
    if pred.shape != mos.shape:
        raise ValueError(f"{pred.size} predictions but {mos.size} MOS values")
    if pred.size < 2:
        raise ValueError(f"need at least 2 videos to compute correlations, got {pred.size}")
    if not (np.isfinite(pred).all() and np.isfinite(mos).all()):
        raise ValueError("predictions and MOS must be finite numbers")
    return pred, mos


def _constant(values):
    return bool(np.ptp(values) == 0)


def srcc(pred, mos) -> float:
    from scipy import stats

    pred, mos = _pairs(pred, mos)
    if _constant(pred) or _constant(mos):
        return math.nan
    return float(stats.spearmanr(pred, mos).statistic)


def krcc(pred, mos) -> float:
    from scipy import stats

    pred, mos = _pairs(pred, mos)
    if _constant(pred) or _constant(mos):
        return math.nan
    return float(stats.kendalltau(pred, mos).statistic)  # tau-b: handles ties


def fit_logistic(pred, mos):
    """Map predictions onto the MOS scale: (mapped values, params or None, method, note).

    The fit starts from b1 = max(mos), b2 = min(mos) (swapped when predictions fall as MOS rises),
    b3 = mean(pred), b4 = std(pred), and retries with a steeper and a flatter b4; the lowest squared
    error wins. A fit that fails, or is no better than a straight line, gives the linear mapping.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    pred, mos = _pairs(pred, mos)
    if _constant(pred):
        return np.full_like(mos, mos.mean()), None, "none", "predictions are constant: nothing to fit"
    slope, intercept = np.polyfit(pred, mos, 1)
    linear = slope * pred + intercept
    linear_sse = float(np.sum((linear - mos) ** 2))
    if pred.size < MIN_FIT_POINTS:
        return linear, (slope, intercept), "linear", f"fewer than {MIN_FIT_POINTS} videos: linear mapping"
    hi, lo = float(mos.max()), float(mos.min())
    if srcc(pred, mos) < 0:
        hi, lo = lo, hi
    spread = float(pred.std()) or 1.0
    best = None
    for b4 in (spread, spread / 4.0, spread * 4.0):
        try:
            with warnings.catch_warnings():
                # "covariance could not be estimated" is about error bars we do not use
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(logistic4, pred, mos, p0=[hi, lo, float(pred.mean()), b4], maxfev=20000)
        except (RuntimeError, ValueError, OverflowError):
            continue
        fitted = logistic4(pred, *params)
        sse = float(np.sum((fitted - mos) ** 2))
        if np.isfinite(sse) and (best is None or sse < best[0]):
            best = (sse, fitted, params)
    if best is None or best[0] > linear_sse:
        return linear, (slope, intercept), "linear", "the 4-parameter logistic fit did not converge: linear mapping"
    return best[1], tuple(float(p) for p in best[2]), "logistic4", None


def score_metrics(pred, mos) -> dict:
    """All score metrics at once (one fit): srcc, plcc, krcc, rmse, n, fit, fit_params, note."""
    from scipy import stats

    pred, mos = _pairs(pred, mos)
    mapped, params, method, note = fit_logistic(pred, mos)
    if _constant(mapped) or _constant(mos):
        pearson = math.nan
    else:
        pearson = float(stats.pearsonr(mapped, mos).statistic)
    return {
        "n": int(pred.size),
        "srcc": srcc(pred, mos),
        "plcc": pearson,
        "krcc": krcc(pred, mos),
        "rmse": float(np.sqrt(np.mean((mapped - mos) ** 2))),
        "fit": method,
        "fit_params": list(params) if params is not None else None,
        "note": note,
    }


# ---------------------------------------------------------------- questions

_OPTION = re.compile(r"^\(?([a-z])(?:[).:]|\s|$)")


def _normal(text: str) -> str:
    return " ".join(str(text).lower().split()).strip(" .!?\"'")


def _first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


def answer_kind(truth: str) -> str:
    """'yes/no', 'option' (a letter A-Z, maybe with text) or 'open'."""
    text = _normal(truth)
    if re.match(r"^(yes|no)\b", text):
        return "yes/no"
    if _OPTION.match(text) and (len(text) == 1 or text[1] in ").:" or text.startswith("(")):
        return "option"
    return "open"


def answer_matches(predicted: str, truth: str) -> bool:
    kind = answer_kind(truth)
    pred = _normal(predicted)
    if kind == "yes/no":
        return _first_word(pred) == _first_word(_normal(truth))
    if kind == "option":
        match = _OPTION.match(pred)
        return bool(match) and match.group(1) == _OPTION.match(_normal(truth)).group(1)
    return pred == _normal(truth)


def accuracy(predicted, truths) -> dict:
    """Overall and per-kind accuracy: {'accuracy', 'n', 'by_kind': {kind: {'accuracy', 'n'}}}."""
    predicted, truths = list(predicted), list(truths)
    if len(predicted) != len(truths):
        raise ValueError(f"{len(predicted)} answers but {len(truths)} ground truths")
    if not truths:
        raise ValueError("no questions to score")
    by_kind = {}
    hits = 0
    for pred, truth in zip(predicted, truths):
        hit = answer_matches(pred, truth)
        hits += hit
        slot = by_kind.setdefault(answer_kind(truth), [0, 0])
        slot[0] += hit
        slot[1] += 1
    return {
        "n": len(truths),
        "accuracy": hits / len(truths),
        "by_kind": {kind: {"accuracy": h / n, "n": n} for kind, (h, n) in sorted(by_kind.items())},
    }
