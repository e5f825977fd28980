"""Tokenizers and sequence classifiers: pretrained (hub name or folder), built from scratch, or a
student cut from a teacher's layers."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from kdlib.config import ModelConfig
from kdlib.errors import KDError, hub_unreachable

SCRATCH = "scratch"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class Classifier:
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 512))


def count_parameters(model: torch.nn.Module, embeddings: bool = True) -> int:
    """Parameters of ``model``; ``embeddings=False`` leaves out the embedding tables (for FLOP counts)."""
    return sum(p.numel() for name, p in model.named_parameters() if embeddings or "embeddings" not in name)


def train_wordpiece(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer whose vocabulary comes from ``texts``.

    The vocabulary is the special tokens, every character (alone and as a ``##`` continuation) and
    then the most frequent words, ties broken alphabetically. The tokenizers library's WordPiece
    trainer breaks frequency ties in hash order, so the same texts would give another vocabulary
    (and another token-cache key) on every run.
    """
    from collections import Counter

    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for text in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    known = set(vocab)
    for word, _count in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
    backend = Tokenizer(WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def _label_maps(label_names: tuple[str, ...]) -> dict:
    return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}


def _scratch(cfg: ModelConfig, label_names: tuple[str, ...], texts: list[str], max_length: int, seed: int) -> Classifier:
    tokenizer = train_wordpiece(texts, cfg.vocab_size)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        **_label_maps(label_names),
    )
    torch.manual_seed(seed)
    return Classifier(tokenizer, BertForSequenceClassification(config))


def _pretrained(role: str, name_or_path: str, label_names: tuple[str, ...]) -> Classifier:
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise KDError(
                f"{role}.name_or_path: {name_or_path!r} is not a model folder (no config.json); expected a Hugging Face model folder, a hub name or 'scratch'"
            )
        source = str(path)
    elif name_or_path.startswith((".", "/", "~")):
        raise KDError(f"{role}.name_or_path: {name_or_path!r} does not exist; expected a model folder, a hub name or 'scratch'")
    else:
        source = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, **_label_maps(label_names))
    except OSError as exc:
        if path.exists():
            raise KDError(f"{role}.name_or_path: {name_or_path!r} could not be loaded as a model: {str(exc).splitlines()[0]}") from None
        raise KDError(
            f"{role}.name_or_path: {name_or_path!r} is not a local folder and {hub_unreachable('downloaded')}; point {role}.name_or_path at a local copy (a folder saved with save_pretrained)"
        ) from None
    if not tokenizer.is_fast:
        raise KDError(f"{role}.name_or_path: {name_or_path!r} has no fast tokenizer (tokenizer.json); expected a model with a fast tokenizer")
    return Classifier(tokenizer, model)


def load_classifier(role: str, cfg: ModelConfig, label_names: tuple[str, ...], texts: list[str], max_length: int, seed: int) -> Classifier:
    """The tokenizer and classifier named by ``cfg``; ``texts`` train the tokenizer of a scratch model."""
    if cfg.name_or_path == SCRATCH:
        classifier = _scratch(cfg, label_names, texts, max_length, seed)
    else:
        classifier = _pretrained(role, cfg.name_or_path, label_names)
    if max_length > classifier.max_positions:
        raise KDError(f"config: data.max_length = {max_length} is above the {role} model's limit of {classifier.max_positions} positions")
    return classifier


def cut_from_teacher(teacher: Classifier, layers: tuple[int, ...]) -> Classifier:
    """A student with the teacher's embeddings, head and the given encoder layers, renumbered 0..k-1."""
    config = copy.deepcopy(teacher.model.config)
    available = config.num_hidden_layers
    if not layers or max(layers) >= available:
        raise KDError(f"student.teacher_layers = {list(layers)} must name layers of the teacher, which has layers 0..{available - 1}")
    config.num_hidden_layers = len(layers)
    student = type(teacher.model)(config)
    renumber = {str(old): str(new) for new, old in enumerate(layers)}
    pattern = re.compile(r"(\.layer\.)(\d+)(\.)")
    state = {}
    for key, value in teacher.model.state_dict().items():
        match = pattern.search(key)
        if match is None:
            state[key] = value.clone()
        elif match.group(2) in renumber:
            state[pattern.sub(lambda m: f"{m.group(1)}{renumber[m.group(2)]}{m.group(3)}", key, count=1)] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KDError(
            f"student.teacher_layers: the teacher's weights do not fit a {len(layers)}-layer copy (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return Classifier(teacher.tokenizer, student)
