"""Scores of predicted logits, computed one way everywhere (training, evaluate, export, report)."""

from __future__ import annotations

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
