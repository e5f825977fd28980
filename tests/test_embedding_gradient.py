import contextlib

import pytest
import torch

from kdlib import batching, precision
from kdlib.config import TrainConfig
from kdlib.embedding_gradient import LazyAdamW, row_gradient
from kdlib.errors import KDError
from kdlib.training import make_optimizer, word_embedding_updates
from tests.helpers import demo_splits, fit_one_epoch, tiny_classifier

CPU = torch.device("cpu")


def steps(model, loader, rows: bool, n: int = 6, max_norm: float = 1.0) -> None:
    """``n`` AdamW steps as the training loop takes them, with row gradients or torch's dense path."""
    optimizer, _ = make_optimizer(model, TrainConfig(learning_rate=1e-2, word_embeddings="dense"), CPU)
    torch.manual_seed(0)  # the same dropout masks with and without, whatever ran before
    with row_gradient(model, CPU) if rows else contextlib.nullcontext() as table:
        assert (table is not None) == rows
        for _, batch in zip(range(n), loader, strict=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
            if table is None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                table.clip_(model.parameters(), max_norm)
                optimizer.step()
                table.zero_grad(optimizer)


@pytest.fixture
def setup(tmp_path):
    splits = demo_splits(max_train=200, max_eval=20)
    encoded = batching.encode(splits.train, tiny_classifier(splits.train.texts).tokenizer, 64, tmp_path)
    return splits, encoded


@pytest.mark.parametrize("max_norm", [1.0, 1e-3])  # 1e-3: every step clips
def test_training_with_row_gradients_matches_dense_gradients(setup, max_norm):
    splits, encoded = setup
    models = []
    for rows in (False, True):
        clf = tiny_classifier(splits.train.texts, seed=3)
        steps(clf.model.train(), batching.train_loader(encoded, clf.tokenizer.pad_token_id, 16, 0), rows, max_norm=max_norm)
        models.append(dict(clf.model.named_parameters()))
    dense, rows = models
    assert dense.keys() == rows.keys()
    for name in dense:
        assert torch.allclose(dense[name], rows[name], rtol=0, atol=1e-6), name


def test_clipping_reads_only_the_used_rows_and_gives_torchs_norm_and_gradients(setup):
    splits, encoded = setup
    clf = tiny_classifier(splits.train.texts)
    loader = iter(batching.train_loader(encoded, clf.tokenizer.pad_token_id, 16, 0))
    with row_gradient(clf.model, CPU) as table:
        for _ in range(2):  # two batches accumulated: the rows of both
            batch = next(loader)
            clf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum().backward()
        copies = [torch.nn.Parameter(p.detach().clone()) for p in clf.model.parameters()]
        for copy, p in zip(copies, clf.model.parameters(), strict=True):
            copy.grad = p.grad.clone()
        expected = torch.nn.utils.clip_grad_norm_(copies, 0.01)
        norm = table.clip_(clf.model.parameters(), 0.01)
        assert norm == pytest.approx(float(expected), rel=1e-5)
        for copy, p in zip(copies, clf.model.parameters(), strict=True):
            assert torch.allclose(copy.grad, p.grad, rtol=1e-5, atol=1e-9)
        weight = clf.model.get_input_embeddings().weight
        grad = weight.grad
        table.zero_grad(torch.optim.SGD(clf.model.parameters(), lr=0.1))
        # The table's buffer is kept and all zero again; every other gradient is freed.
        assert weight.grad is grad and not grad.any()
        assert all(p.grad is None for p in clf.model.parameters() if p is not weight)


def test_the_gradient_stays_dense_and_holds_only_the_batch_rows(setup):
    splits, encoded = setup
    clf = tiny_classifier(splits.train.texts)
    batch = next(iter(batching.train_loader(encoded, clf.tokenizer.pad_token_id, 16, 0)))
    embeddings = clf.model.get_input_embeddings()
    with row_gradient(clf.model, CPU) as table:
        assert table is not None and embeddings.sparse
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
    with row_gradient(clf.model, CPU) as table:
        assert table is None
        assert not clf.model.get_input_embeddings().sparse
    assert clf.model.get_input_embeddings().weight.grad is None


def test_fit_returns_a_model_without_gradient_buffers(setup):
    splits, encoded = setup
    result = fit_one_epoch(tiny_classifier(splits.train.texts), encoded)
    assert all(p.grad is None for p in result.model.parameters())
    assert not result.model.get_input_embeddings().sparse


def test_lazy_adamw_moves_the_used_rows_as_adamw_does_and_leaves_the_others_as_they_were():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(40, 8))
    loaded = table.detach().clone()
    dense = torch.nn.Parameter(loaded.clone())
    adamw = torch.optim.AdamW([dense], lr=1e-2, weight_decay=0.1, fused=True)
    lazy = LazyAdamW(table)
    used = torch.tensor([3, 7, 8, 20])
    for _ in range(3):  # the same rows every step: on them, lazy and dense AdamW are the same formula
        grad = torch.zeros_like(table)
        grad[used] = torch.randn(len(used), 8)
        table.grad, dense.grad = grad, grad.clone()
        adamw.step()
        lazy.step(used, adamw.param_groups[0])  # the same settings
    assert torch.allclose(table[used], dense[used], rtol=0, atol=1e-6)
    others = torch.ones(len(table), dtype=torch.bool)
    others[used] = False
    # Dense AdamW decays every row; the lazy one leaves the unused rows, and their moments, as they were.
    assert torch.equal(table[others], loaded[others]) and not torch.allclose(dense[others], loaded[others])
    exp_avg, exp_avg_sq, steps = lazy.state
    assert not exp_avg[others].any() and not exp_avg_sq[others].any() and int(steps) == 3
    assert torch.equal(exp_avg[used], adamw.state[dense]["exp_avg"][used])


class Wrapped(torch.nn.Module):
    """A model whose input embeddings are not a torch.nn.Embedding."""

    def __init__(self):
        super().__init__()
        self.words = torch.nn.Linear(4, 4)

    def get_input_embeddings(self):
        return self.words


@pytest.mark.parametrize(
    "device, table, scratch, expected",
    [
        ("cpu", "embedding", False, "lazy"),
        ("cuda", "embedding", False, "dense"),
        ("cpu", "linear", False, "dense"),
        ("cpu", "embedding", True, "dense"),
    ],
)
def test_auto_word_embeddings_are_lazy_on_a_cpu_for_a_trained_table_only(device, table, scratch, expected):
    model = tiny_classifier(demo_splits(max_train=50, max_eval=10).train.texts).model if table == "embedding" else Wrapped()
    assert word_embedding_updates(model, TrainConfig(), torch.device(device), scratch=scratch) == expected  # auto is the default


def test_lazy_word_embeddings_need_an_embedding_table():
    with pytest.raises(KDError, match="word_embeddings: lazy needs input embeddings that are a torch.nn.Embedding, not Linear"):
        make_optimizer(Wrapped(), TrainConfig(word_embeddings="lazy"), CPU)


def test_lazy_word_embeddings_refuse_fp16(monkeypatch):
    # fp16 needs CUDA; what matters is what the precision resolves to on the machine
    monkeypatch.setattr(precision, "resolve", lambda requested: precision.Precision("fp16", "a CUDA GPU without bf16"))
    model = tiny_classifier(demo_splits(max_train=50, max_eval=10).train.texts).model
    with pytest.raises(KDError, match="word_embeddings: lazy cannot train in fp16"):
        make_optimizer(model, TrainConfig(word_embeddings="lazy"), CPU)
