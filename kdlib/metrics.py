"""Scores of predicted logits, computed one way everywhere (training, evaluate, export, report)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of examples whose highest logit is the label; logits [n, labels], labels [n]."""
    return float((logits.argmax(-1) == labels).mean())


def agreement(logits: np.ndarray, other: np.ndarray) -> float:
    """Share of examples where two models predict the same label (student against teacher)."""
    return float((logits.argmax(-1) == other.argmax(-1)).mean())


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and mean cross-entropy of logits [n, labels] against labels [n]."""
    return {"accuracy": accuracy(logits, labels), "loss": float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))}


@dataclass(frozen=True)
class PairedGain:
    """Accuracy of model A minus model B on the same sentences, with its uncertainty."""

    difference: float
    low: float  # 95% paired-bootstrap interval
    high: float
    p_value: float  # exact McNemar test: do A and B err on different sentences more often one way than the other?
    a_only: int  # sentences only A gets right
    b_only: int  # sentences only B gets right


def paired_gain(a_logits: np.ndarray, b_logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> PairedGain:
    """Paired comparison of two models' predictions on the same sentences (logits [n, labels], labels [n]).

    Resampling sentences, not each model on its own, keeps what the two share: both get the easy
    sentences right, so only the sentences they disagree on move the interval.
    """
    from scipy import stats

    a_right = (a_logits.argmax(-1) == labels).astype(np.float64)
    b_right = (b_logits.argmax(-1) == labels).astype(np.float64)
    difference = float(a_right.mean() - b_right.mean())
    a_only, b_only = int(((a_right == 1) & (b_right == 0)).sum()), int(((a_right == 0) & (b_right == 1)).sum())
    if a_only + b_only == 0:  # identical predictions: no resample can differ
        return PairedGain(difference, difference, difference, 1.0, 0, 0)
    interval = stats.bootstrap(
        (a_right, b_right),
        lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=10_000,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    p_value = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
    return PairedGain(difference, float(interval.low), float(interval.high), float(p_value), a_only, b_only)
