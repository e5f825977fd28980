"""Tiny models and data the tests build themselves (no downloads)."""

from __future__ import annotations

from kdlib import batching
from kdlib.config import DataConfig, ModelConfig, TrainConfig
from kdlib.data import load_splits
from kdlib.models import load_classifier
from kdlib.training import FitResult, fit

TINY = ModelConfig(name_or_path="scratch", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=200)
LABELS = ("negative", "positive")


def demo_splits(max_train: int | None = 1500, max_eval: int | None = 200, validation: int = 200):
    """``max_train`` training sentences after ``validation`` of them are carved off (None: all)."""
    limit = None if max_train is None else max_train + validation
    return load_splits(DataConfig(source="builtin:sentiment", max_train_examples=limit, max_eval_examples=max_eval, validation_size=validation))


def tiny_classifier(texts, seed: int = 0, cfg: ModelConfig = TINY):
    return load_classifier("teacher", cfg, LABELS, texts, 64, seed)


def fit_one_epoch(clf, encoded: batching.Encoded, cfg: TrainConfig | None = None, **kwargs) -> FitResult:
    """``fit`` for one epoch on ``encoded`` with a metric-less evaluation: for tests of what training
    does to the model, not of how well it learns."""
    cfg = cfg or TrainConfig(learning_rate=1e-3, epochs=1, batch_size=16, mixed_precision="no")
    pad = clf.tokenizer.pad_token_id
    train, scored = batching.train_loader(encoded, pad, cfg.batch_size, 0), batching.eval_loader(encoded, pad, 64)
    return fit(clf.model, train, scored, lambda logits: {"accuracy": 0.0, "loss": 0.0}, cfg, **kwargs)
