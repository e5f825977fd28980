"""The device-sharing benchmark's pieces, on the CPU with a tiny student."""

from __future__ import annotations

import json

import numpy as np
import pytest

from search.benchmarks import share_bench

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def test_sentences_have_sst2_like_lengths_and_valid_ids():
    encoded = share_bench.sentences(2000, seed=0)
    lengths = encoded.lengths
    assert lengths.min() >= 3 and lengths.max() <= 64
    assert 8 <= np.median(lengths) <= 16  # SST-2's training phrases: about 10 wordpieces plus [CLS] and [SEP]
    assert all(((ids >= 0) & (ids < share_bench.VOCAB)).all() for ids in encoded.input_ids)
    assert set(np.unique(encoded.labels)) == {0, 1}


def test_trials_sharing_the_device_each_report_their_rate():
    rates = share_bench.measure(TINY, shares=2, steps=2, warmup=1)
    assert len(rates) == 2 and all(rate > 0 for rate in rates)


def test_the_script_writes_one_row_per_shape_and_share(tmp_path, monkeypatch):
    monkeypatch.setitem(share_bench.SHAPES, "minilm3", TINY)
    out = tmp_path / "share.json"
    argv = ["--shapes", "minilm3", "--shares", "1", "2", "--word-embeddings", "dense", "lazy", "--steps", "2", "--warmup", "1"]
    share_bench.main([*argv, "--trial-examples", "3600", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(row["word_embeddings"], row["shares"]) for row in rows] == [("dense", 1), ("dense", 2), ("lazy", 1), ("lazy", 2)]
    assert all(row["trials_per_hour"] == pytest.approx(row["examples_per_s"]) for row in rows)  # 3,600 examples per trial
