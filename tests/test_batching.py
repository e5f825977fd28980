import numpy as np
import pytest

from kdlib import batching
from tests.helpers import demo_splits, tiny_classifier


@pytest.fixture(scope="module")
def setup():
    splits = demo_splits()
    return splits, tiny_classifier(splits.train.texts)


def test_encode_caches_on_disk_by_tokenizer_length_and_data(setup, tmp_path, monkeypatch):
    splits, clf = setup
    first = batching.encode(splits.train, clf.tokenizer, 64, tmp_path)
    assert len(list((tmp_path / "tokenized").iterdir())) == 1
    # A second call must not tokenize again: make tokenizing impossible and read the cache.
    monkeypatch.setattr(type(clf.tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenized twice"))
    second = batching.encode(splits.train, clf.tokenizer, 64, tmp_path)
    assert [a.tolist() for a in first.input_ids] == [b.tolist() for b in second.input_ids]
    assert (first.labels == second.labels).all()
    monkeypatch.undo()
    assert batching.cache_key(clf.tokenizer, 64, splits.train.fingerprint) != batching.cache_key(clf.tokenizer, 32, splits.train.fingerprint)
    assert batching.cache_key(clf.tokenizer, 64, splits.train.fingerprint) != batching.cache_key(clf.tokenizer, 64, splits.eval.fingerprint)
    other = tiny_classifier(splits.eval.texts)  # another vocabulary
    assert batching.cache_key(clf.tokenizer, 64, splits.train.fingerprint) != batching.cache_key(other.tokenizer, 64, splits.train.fingerprint)


def test_truncates_to_max_length(setup, tmp_path):
    splits, clf = setup
    encoded = batching.encode(splits.train, clf.tokenizer, 8, tmp_path)
    assert encoded.lengths.max() == 8


def test_train_batches_cover_every_example_once_per_epoch_and_group_lengths(setup, tmp_path):
    splits, clf = setup
    encoded = batching.encode(splits.train, clf.tokenizer, 64, tmp_path)
    loader = batching.train_loader(encoded, clf.tokenizer.pad_token_id, 16, seed=3)
    orders = []
    for epoch in (1, 2):
        loader.batch_sampler.set_epoch(epoch)
        seen, padded = [], 0
        for batch in loader:
            seen += batch["index"].tolist()
            padded += batch["input_ids"].numel()
            assert (batch["attention_mask"].sum(1).numpy() == encoded.lengths[batch["index"].numpy()]).all()
        assert sorted(seen) == list(range(len(encoded)))
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled per epoch
    # Padding to the batch's longest member with length grouping beats random batches.
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(encoded)), len(loader))
    random_padded = sum(len(b) * encoded.lengths[b].max() for b in random_batches)
    assert padded < random_padded


def test_same_seed_same_batches(setup, tmp_path):
    splits, clf = setup
    encoded = batching.encode(splits.train, clf.tokenizer, 64, tmp_path)
    a = [b["index"].tolist() for b in batching.train_loader(encoded, 0, 16, seed=1)]
    b = [b["index"].tolist() for b in batching.train_loader(encoded, 0, 16, seed=1)]
    c = [b["index"].tolist() for b in batching.train_loader(encoded, 0, 16, seed=2)]
    assert a == b != c


def test_eval_batches_sorted_longest_first(setup, tmp_path):
    splits, clf = setup
    encoded = batching.encode(splits.eval, clf.tokenizer, 64, tmp_path)
    widths = [b["input_ids"].shape[1] for b in batching.eval_loader(encoded, 0, 50)]
    assert widths == sorted(widths, reverse=True)
