"""The transfer set: sentences that only the teacher labels.

Task-specific data augmentation as in Tang et al. (2019, "Distilling task-specific knowledge from
BERT into simple neural networks") and TinyBERT (Jiao et al., 2020): each copy of a sentence masks
words, swaps words for near neighbours and may shrink to an n-gram. The neighbours come from the
teacher's own input embeddings, so no extra model is needed. A copy has no trustworthy hard label
(swapping "good" for "bad" flips it), so students learn from it through the KL term only. Beside
the copies, a set may hold unlabelled in-domain sentences (``kdlib.data.load_unlabelled``): the
classic setting of distillation, where a small labelled set and plenty of raw text meet.

Texts are stored with ``MASK`` where a word was masked; each model reads its own mask token there
(``[MASK]`` for BERT, ``<mask>`` for MPNet), which is what lets a student with another tokenizer
learn from the same set. A labelled set is cached as an artifact of the teacher's run, keyed by
the teacher version, the training data's fingerprint and every augmentation setting
(``kdlib/student.py`` keeps that cache; this module only makes sets).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from kdlib.config import TransferConfig
from kdlib.data import TextSplit, fingerprint
from kdlib.losses import NO_LABEL
from kdlib.models import Classifier

MASK = "[MASK]"  # the placeholder in stored texts
ARTIFACT_DIR = "transfer_sets"
NGRAM_MAX = 5  # Tang et al.: n-grams of 1 to 5 words
QUERY_CHUNK = 2048  # query words per similarity product: bounds memory at chunk x vocabulary floats


@dataclass(frozen=True)
class TransferSet:
    texts: list[str]  # with MASK placeholders
    logits: np.ndarray  # the teacher's, [n, labels]
    info: dict  # examples, copies, unlabelled, label_flip_rate, augment_seconds, label_seconds (and digest, once cached)


def _word_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Whole alphabetic words of the vocabulary and their ids (no word pieces, no special tokens)."""
    words = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token.startswith("##") or token in tokenizer.all_special_tokens:
            continue
        word = tokenizer.convert_tokens_to_string([token]).strip()
        if word.isalpha() and len(word) > 1:
            words.setdefault(word.lower(), token_id)
    return words


def embedding_neighbours(tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor, words: set[str], k: int) -> dict[str, list[str]]:
    """For each of ``words`` that is a whole word of the vocabulary: its ``k`` nearest other words by
    cosine similarity of the input embeddings [vocab, hidden]."""
    vocab = _word_tokens(tokenizer)
    names = list(vocab)
    table = torch.nn.functional.normalize(embeddings[[vocab[n] for n in names]].float(), dim=-1)
    queries = [w for w in sorted(words) if w in vocab]
    position = {name: i for i, name in enumerate(names)}
    out: dict[str, list[str]] = {}
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[start : start + QUERY_CHUNK]
        rows = torch.tensor([position[w] for w in chunk])
        similarity = table[rows] @ table.T  # [chunk, vocabulary words]
        similarity[torch.arange(len(chunk)), rows] = -2.0  # never a word's own neighbour
        best = similarity.topk(min(k, len(names) - 1), dim=-1).indices
        for word, row in zip(chunk, best.tolist(), strict=True):
            out[word] = [names[i] for i in row]
    return out


def augment(texts: list[str], cfg: TransferConfig, neighbours: dict[str, list[str]]) -> tuple[list[str], np.ndarray]:
    """``cfg.copies`` augmented copies of each text, minus copies equal to their text or to an
    earlier copy: (copies, index of each copy's source text). Seeded by (seed, position), so a
    text's copies do not depend on what the other texts say."""
    copies, sources = [], []
    for index, text in enumerate(texts):
        rng = np.random.default_rng((cfg.seed, index))
        words = text.split()
        seen = {text}
        for _ in range(cfg.copies):
            out = []
            for word in words:
                draw = rng.random()
                options = neighbours.get(word.lower())
                if draw < cfg.p_mask:
                    out.append(MASK)
                elif draw < cfg.p_mask + cfg.p_replace and options:
                    out.append(options[rng.integers(len(options))])
                else:
                    out.append(word)
            if len(out) > 1 and rng.random() < cfg.p_ngram:
                n = int(rng.integers(1, min(NGRAM_MAX, len(out)) + 1))
                start = int(rng.integers(0, len(out) - n + 1))
                out = out[start : start + n]
            copy = " ".join(out)
            if copy not in seen:
                seen.add(copy)
                copies.append(copy)
                sources.append(index)
    return copies, np.asarray(sources, dtype=np.int64)


def for_model(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The texts as ``tokenizer``'s model reads them: its own mask token (or unknown token) at each MASK."""
    token = tokenizer.mask_token or tokenizer.unk_token
    return [text.replace(MASK, token) for text in texts] if token != MASK else texts


def as_split(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> TextSplit:
    """Transfer texts as a split of unlabelled examples, ready for ``batching.encode``."""
    rendered = for_model(texts, tokenizer)
    labels = np.full(len(rendered), NO_LABEL, dtype=np.int64)
    return TextSplit("transfer", rendered, labels, fingerprint(rendered, labels))


def key(teacher_model: str, teacher_version: str, train_fingerprint: str, cfg: TransferConfig, max_length: int, unlabelled: list[str]) -> dict:
    settings = asdict(cfg)
    if cfg.unlabelled_split is None:  # so a set made before unlabelled sentences existed keeps its key and its cache
        settings = {name: value for name, value in settings.items() if not name.startswith("unlabelled_")}
    else:
        settings["unlabelled_fingerprint"] = fingerprint(unlabelled, np.full(len(unlabelled), NO_LABEL, dtype=np.int64))
    return {
        "teacher_model": teacher_model,
        "teacher_version": str(teacher_version),
        "train_fingerprint": train_fingerprint,
        "max_length": max_length,
        **{f"transfer.{name}": value for name, value in settings.items()},
    }


def make(cfg: TransferConfig, train: TextSplit, unlabelled: list[str], teacher: Classifier, label: Callable[[list[str]], np.ndarray]) -> TransferSet:
    """Augment ``train``, add the ``unlabelled`` sentences and label them all: ``label(texts)`` returns
    the teacher's logits [n, labels] for texts as the teacher's tokenizer reads them (see ``as_split``)."""
    started = time.perf_counter()
    copies, sources = [], np.zeros(0, dtype=np.int64)
    if cfg.copies:
        words = {w.lower() for text in train.texts for w in text.split()}
        embeddings = teacher.model.get_input_embeddings().weight.detach()
        copies, sources = augment(train.texts, cfg, embedding_neighbours(teacher.tokenizer, embeddings, words, cfg.neighbours))
    augmented = time.perf_counter()
    texts = copies + unlabelled
    logits = label(texts)
    flips = float((logits[: len(copies)].argmax(-1) != train.labels[sources]).mean()) if copies else 0.0
    info = {
        "examples": len(texts),
        "copies": len(copies),
        "unlabelled": len(unlabelled),
        "label_flip_rate": flips,  # the teacher's label of a copy is not its source sentence's label
        "augment_seconds": augmented - started,
        "label_seconds": time.perf_counter() - augmented,
    }
    return TransferSet(texts, logits, info)
