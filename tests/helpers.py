"""Tiny models and data the tests build themselves (no downloads)."""

from __future__ import annotations

from kdlib.config import DataConfig, ModelConfig
from kdlib.data import load_splits
from kdlib.models import load_classifier

TINY = ModelConfig(name_or_path="scratch", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=200)
LABELS = ("negative", "positive")


def demo_splits(max_train: int | None = 1500, max_eval: int | None = 200, validation: int = 200):
    """``max_train`` training sentences after ``validation`` of them are carved off (None: all)."""
    limit = None if max_train is None else max_train + validation
    return load_splits(DataConfig(source="builtin:sentiment", max_train_examples=limit, max_eval_examples=max_eval, validation_size=validation))


def tiny_classifier(texts, seed: int = 0, cfg: ModelConfig = TINY):
    return load_classifier("teacher", cfg, LABELS, texts, 64, seed)
