import contextlib

import pytest
import torch

from kdlib import batching
from kdlib.config import TrainConfig
from kdlib.embedding_gradient import row_gradient
from kdlib.training import make_optimizer
from tests.helpers import demo_splits, fit_one_epoch, tiny_classifier

CPU = torch.device("cpu")


def steps(model, loader, rows: bool, n: int = 6) -> None:
    """``n`` AdamW steps as the training loop takes them, with or without row gradients."""
    optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-2), CPU)
    torch.manual_seed(0)  # the same dropout masks with and without, whatever ran before
    with row_gradient(model, CPU) if rows else contextlib.nullcontext(False) as keep:
        assert keep == rows
        for _, batch in zip(range(n), loader, strict=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=not keep)


@pytest.fixture
def setup(tmp_path):
    splits = demo_splits(max_train=200, max_eval=20)
    encoded = batching.encode(splits.train, tiny_classifier(splits.train.texts).tokenizer, 64, tmp_path)
    return splits, encoded


def test_training_with_row_gradients_matches_dense_gradients(setup):
    splits, encoded = setup
    models = []
    for rows in (False, True):
        clf = tiny_classifier(splits.train.texts, seed=3)
        steps(clf.model.train(), batching.train_loader(encoded, clf.tokenizer.pad_token_id, 16, 0), rows)
        models.append(dict(clf.model.named_parameters()))
    dense, rows = models
    assert dense.keys() == rows.keys()
    for name in dense:
        assert torch.allclose(dense[name], rows[name], rtol=0, atol=1e-6), name


def test_the_gradient_stays_dense_and_holds_only_the_batch_rows(setup):
    splits, encoded = setup
    clf = tiny_classifier(splits.train.texts)
    batch = next(iter(batching.train_loader(encoded, clf.tokenizer.pad_token_id, 16, 0)))
    embeddings = clf.model.get_input_embeddings()
    with row_gradient(clf.model, CPU) as keep:
        assert keep and embeddings.sparse
        clf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum().backward()
        grad = embeddings.weight.grad
        assert grad.layout == torch.strided and grad.shape == embeddings.weight.shape
        touched = torch.nonzero(grad.abs().sum(dim=1)).flatten()
        assert set(touched.tolist()) <= set(batch["input_ids"].flatten().tolist())
    assert not embeddings.sparse


def test_frozen_embeddings_keep_the_dense_path(setup):
    splits, _ = setup
    clf = tiny_classifier(splits.train.texts)
    clf.model.get_input_embeddings().weight.requires_grad_(False)
    with row_gradient(clf.model, CPU) as keep:
        assert not keep
        assert not clf.model.get_input_embeddings().sparse
    assert clf.model.get_input_embeddings().weight.grad is None


def test_fit_returns_a_model_without_gradient_buffers(setup):
    splits, encoded = setup
    result = fit_one_epoch(tiny_classifier(splits.train.texts), encoded)
    assert all(p.grad is None for p in result.model.parameters())
    assert not result.model.get_input_embeddings().sparse
