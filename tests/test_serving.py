"""Serving: the tokenization every backend shares, and the PyTorch backend's logits alone and in a padded batch."""

from __future__ import annotations

import numpy as np
import torch

from kdlib.serving import Tokenize, TorchBackend
from tests.helpers import demo_splits, tiny_classifier


def test_tokenize_gives_the_ids_and_mask_of_the_transformers_call(tmp_path):
    splits = demo_splits(max_train=300, max_eval=40)
    tokenizer = tiny_classifier(splits.train.texts).tokenizer
    tokenizer.save_pretrained(tmp_path)
    texts = splits.eval.texts[:16] + [" ".join(splits.train.texts[:20])]  # the last is longer than max_length
    tokenize = Tokenize(tmp_path, max_length=24)
    for batch in ([texts[0]], texts):
        expected = tokenizer(batch, padding=True, truncation=True, max_length=24, return_tensors="np")
        ids, mask = tokenize(batch)
        assert ids.dtype == mask.dtype == np.int64
        np.testing.assert_array_equal(ids, expected["input_ids"])
        np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert ids.shape == (17, 24) and not mask.all()  # cut at max_length, and the short ones padded


def test_logits_do_not_depend_on_batching_or_padding(tmp_path):
    splits = demo_splits(max_train=300, max_eval=40)
    classifier = tiny_classifier(splits.train.texts)
    classifier.model.save_pretrained(tmp_path)
    classifier.tokenizer.save_pretrained(tmp_path)
    backend = TorchBackend(tmp_path, max_length=64)
    texts = sorted(splits.eval.texts[:8], key=len)
    assert len(classifier.tokenizer(texts[0])["input_ids"]) < len(classifier.tokenizer(texts[-1])["input_ids"])  # the batch pads
    batched = backend.logits(texts)
    alone = np.concatenate([backend.logits([text]) for text in texts])
    assert batched.shape == (8, 2) and np.abs(batched - alone).max() < 1e-5
    # The check can fail: the short sentence's logits do change when its padding is not masked.
    padded, _ = backend.tokenize(texts)
    with torch.inference_mode():
        unmasked = backend.model(input_ids=torch.from_numpy(padded)).logits.numpy()
    assert np.abs(unmasked[0] - alone[0]).max() > 100 * np.abs(batched - alone).max()
