"""Tokenize once, cache on disk, and batch with as little padding as possible.

SST-2 sentences average ~13 wordpieces, so padding every batch to max_length (128) would spend ~90%
of the compute on padding. Training batches are padded to their longest member and drawn from
groups of similar length; evaluation batches are sorted by length and large.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from kdlib.data import TextSplit

# Training batches are drawn from megabatches of this many batches, each sorted by length: most of
# the padding saving of a full sort, while batch composition stays random.
MEGABATCH = 50


@dataclass(frozen=True)
class Encoded:
    """One tokenized split: ``input_ids[i]`` is example i's wordpiece ids (no padding)."""

    input_ids: list[np.ndarray]
    labels: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's definition (vocab, normalizer, special tokens), not its name.

    Truncation and padding are left out: they are per-call settings the backend remembers.
    """
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(tokenizer: PreTrainedTokenizerBase, max_length: int, data_fingerprint: str) -> str:
    return hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}|{max_length}|{data_fingerprint}".encode()).hexdigest()[:20]


def encode(split: TextSplit, tokenizer: PreTrainedTokenizerBase, max_length: int, cache_dir: str | Path) -> Encoded:
    """Token ids for ``split``, read from the cache when this (tokenizer, max length, data) was seen before."""
    path = Path(cache_dir) / "tokenized" / f"{cache_key(tokenizer, max_length, split.fingerprint)}.npz"
    if path.is_file():
        stored = np.load(path)
        offsets = stored["offsets"]
        flat = stored["ids"]
        ids = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        return Encoded(ids, stored["labels"])
    batch = tokenizer(split.texts, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False)
    ids = [np.asarray(x, dtype=np.int32) for x in batch["input_ids"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
    # Write then rename, so a killed process never leaves a truncated cache entry behind.
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=np.concatenate(ids), offsets=offsets, labels=split.labels)
    tmp.replace(path)
    return Encoded(ids, split.labels)


class Collator:
    """Pads a list of example indices to the longest example; keeps the indices for lookups."""

    def __init__(self, encoded: Encoded, pad_id: int):
        self.encoded = encoded
        self.pad_id = pad_id

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.encoded.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = row
            mask[j, : len(row)] = 1
        return {
            "input_ids": torch.from_numpy(ids),  # [batch, width]
            "attention_mask": torch.from_numpy(mask),  # [batch, width]
            "labels": torch.from_numpy(self.encoded.labels[indices]),  # [batch]
            "index": torch.as_tensor(indices),  # [batch] example positions in the split
        }


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Random batches of similar-length examples; a new order every epoch, reproducible by seed."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.lengths))
        size = self.batch_size * MEGABATCH
        batches = []
        for start in range(0, len(order), size):
            mega = order[start : start + size]
            mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            batches += [mega[i : i + self.batch_size].tolist() for i in range(0, len(mega), self.batch_size)]
        # Shuffle whole batches so an epoch does not run long-to-short within each megabatch.
        for b in rng.permutation(len(batches)):
            yield batches[b]


def train_loader(encoded: Encoded, pad_id: int, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    sampler = LengthGroupedBatches(encoded.lengths, batch_size, seed)
    return torch.utils.data.DataLoader(range(len(encoded)), batch_sampler=sampler, collate_fn=Collator(encoded, pad_id))


def eval_loader(encoded: Encoded, pad_id: int, batch_size: int) -> torch.utils.data.DataLoader:
    """Batches sorted by length (longest first, so memory peaks at once); ``index`` restores order."""
    order = np.argsort(-encoded.lengths, kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return torch.utils.data.DataLoader(range(len(encoded)), batch_sampler=batches, collate_fn=Collator(encoded, pad_id))


def concat(first: Encoded, second: Encoded) -> Encoded:
    """``first``'s examples, then ``second``'s: example i of ``second`` becomes len(first) + i."""
    return Encoded(first.input_ids + second.input_ids, np.concatenate([first.labels, second.labels]))
