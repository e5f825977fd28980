"""The PyTorch serving backend: a sentence gets the same logits alone as inside a padded batch."""

from __future__ import annotations

import numpy as np
import torch

from kdlib.serving import TorchBackend
from tests.helpers import demo_splits, tiny_classifier


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
    padded = backend.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        unmasked = backend.model(input_ids=padded["input_ids"]).logits.numpy()
    assert np.abs(unmasked[0] - alone[0]).max() > 100 * np.abs(batched - alone).max()
