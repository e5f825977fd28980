"""Labelled sentences from the hub, local files or the built-in demo sample, validated.

Every source ends up as a ``TextSplit``: texts, integer label ids and a content fingerprint. The
fingerprint hashes every (text, label) pair in order, so anything keyed by it (tokenized caches,
teacher logits) can never be matched to other examples or another order.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kdlib import demo_data
from kdlib.config import DataConfig
from kdlib.errors import KDError, hub_unreachable

FILE_READERS = {
    ".tsv": lambda p: pd.read_csv(p, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, encoding="utf-8"),
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8"),
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False, encoding="utf-8"),
    ".parquet": pd.read_parquet,
}
# Where a split's rows sit for humans reading the error: header line + 1-based rows.
FIRST_ROW_LINE = {".tsv": 2, ".csv": 2, ".jsonl": 1}
# GLUE calls the validation split "dev".
SPLIT_ALIASES = {"validation": ("validation", "dev"), "dev": ("dev", "validation")}
PATH_SUFFIXES = tuple(FILE_READERS) + (".json",)


@dataclass(frozen=True)
class TextSplit:
    name: str
    texts: list[str]
    labels: np.ndarray  # int64 label ids, shape [n]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Splits:
    """Training sentences; validation, which pruning and every choice of a model may look at; and
    evaluation, scored once per trained model and never used to choose one."""

    train: TextSplit
    validation: TextSplit
    eval: TextSplit


def fingerprint(texts: list[str], labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    for text, label in zip(texts, labels.tolist(), strict=True):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()[:16]


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(PATH_SUFFIXES) or os.sep == "\\" and "\\" in source


def _split_file(folder: Path, split: str) -> Path:
    for stem in SPLIT_ALIASES.get(split, (split,)):
        for suffix in FILE_READERS:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    found = sorted(p.name for p in folder.iterdir() if p.suffix in FILE_READERS)
    raise KDError(
        f"data: folder {str(folder)!r} has no file for split {split!r}; expected {split}.tsv (GLUE layout), "
        f"{split}.csv, {split}.jsonl or {split}.parquet (found: {', '.join(found) or 'no data files'})"
    )


def _read_file(path: Path) -> pd.DataFrame:
    try:
        return FILE_READERS[path.suffix](path)
    except UnicodeDecodeError as exc:
        raise KDError(f"data: {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected a UTF-8 file") from None
    except PermissionError:
        raise KDError(f"data: {path} cannot be read (permission denied)") from None
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KDError(f"data: {path} cannot be parsed as {path.suffix[1:]}: {first_line}") from None


def _load_local(folder: Path, split: str) -> tuple[pd.DataFrame, str, int]:
    """Rows of one split, where they came from (for messages), and the line number of the first row."""
    if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file():
        import datasets

        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            name = next((s for s in SPLIT_ALIASES.get(split, (split,)) if s in loaded), None)
            if name is None:
                raise KDError(f"data: {folder} has no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[name]
        return loaded.to_pandas(), f"{folder} split {split!r}", 0
    path = _split_file(folder, split)
    return _read_file(path), str(path), FIRST_ROW_LINE.get(path.suffix, 0)


def _load_hub(name: str, split: str) -> tuple[pd.DataFrame, str, int]:
    import datasets

    hint = "point data.source at a local copy (a GLUE folder with train.tsv/dev.tsv, <split>.csv/.jsonl/.parquet files, or a save_to_disk folder)"
    try:
        loaded = datasets.load_dataset(name, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise KDError(f"data: hub dataset {name!r} has no split {split!r} ({exc})") from None
        raise
    except Exception as exc:  # the hub client raises many types for "cannot reach / not cached"
        raise KDError(f"data: source {name!r} is not a local path and {hub_unreachable()} ({type(exc).__name__}); {hint}") from None
    return loaded.to_pandas(), f"hub dataset {name!r} split {split!r}", 0


def _row(first_line: int) -> Callable[[int], str]:
    return (lambda i: f"line {i + first_line}") if first_line else (lambda i: f"row {i}")


def _texts(frame: pd.DataFrame, where: str, first_line: int, split: str, columns: dict[str, str]) -> list[str]:
    """The sentences of a split; ``columns`` (column -> its config key) must all be present, the first holds the text."""
    for column, key in columns.items():
        if column not in frame.columns:
            raise KDError(f"data: {where} has no column {column!r} (columns: {', '.join(map(str, frame.columns))}); set {key}")
    if len(frame) == 0:
        raise KDError(f"data: {where} is empty; expected at least one sentence in split {split!r}")
    texts = frame[next(iter(columns))].tolist()
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise KDError(f"data: {where} {_row(first_line)(i)}: sentence {text!r} is empty or not text; expected a non-empty string")
    return texts


def _to_split(frame: pd.DataFrame, where: str, first_line: int, split: str, cfg: DataConfig, limit: int | None) -> TextSplit:
    texts = _texts(frame, where, first_line, split, {cfg.text_column: "data.text_column", cfg.label_column: "data.label_column"})
    row = _row(first_line)
    names = {name: i for i, name in enumerate(cfg.label_names)}
    ids = {str(i): i for i in range(len(cfg.label_names))}
    labels = np.empty(len(frame), dtype=np.int64)
    for i, raw in enumerate(frame[cfg.label_column].tolist()):
        key = str(int(raw)) if isinstance(raw, (int, np.integer)) or (isinstance(raw, float) and raw.is_integer()) else str(raw).strip()
        if key not in ids and key not in names:
            raise KDError(
                f"data: {where} {row(i)}: label {raw!r} is not in the label set; expected an id 0..{len(names) - 1} "
                f"or one of {list(cfg.label_names)} (data.label_names)"
            )
        labels[i] = ids[key] if key in ids else names[key]
    if limit is not None and limit < len(texts):
        # A seeded subset keeps the source order, so the fingerprint of a given limit is stable.
        keep = np.sort(np.random.default_rng(0).choice(len(texts), size=limit, replace=False))
        texts, labels = [texts[i] for i in keep], labels[keep]
    return TextSplit(split, texts, labels, fingerprint(texts, labels))


def _frame(cfg: DataConfig, split: str) -> tuple[pd.DataFrame, str, int]:
    source = cfg.source
    if source.startswith(demo_data.SCHEME):
        return demo_data.load(source, split), f"{source} split {split!r}", 0
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KDError(
                f"data: source {source!r} is a file; expected a folder holding one file per split (train.tsv and dev.tsv in GLUE layout) or a hub dataset name"
            )
        return _load_local(path, split)
    if _looks_like_path(source):
        raise KDError(f"data: source {source!r} does not exist; expected a folder with the data files or a hub dataset name")
    return _load_hub(source, split)


def load_split(cfg: DataConfig, split: str, limit: int | None = None) -> TextSplit:
    """Read and validate one split of ``cfg.source``; raises KDError on bad data or an unknown split."""
    return _to_split(*_frame(cfg, split), split, cfg, limit)


def _subset(split: TextSplit, name: str, keep: np.ndarray) -> TextSplit:
    texts, labels = [split.texts[i] for i in keep], split.labels[keep]
    return TextSplit(name, texts, labels, fingerprint(texts, labels))


def carve_validation(train: TextSplit, cfg: DataConfig) -> tuple[TextSplit, TextSplit]:
    """(train without validation, validation): a stratified, seeded share or count of ``train``, both in source order."""
    from sklearn.model_selection import train_test_split

    size = cfg.validation_size if cfg.validation_size < 1 else int(cfg.validation_size)
    if isinstance(size, int) and size >= len(train):
        raise KDError(
            f"config: data.validation_size = {size} leaves no training sentences; expected fewer than the {len(train)} sentences of split {train.name!r}"
        )
    try:
        kept, carved = train_test_split(np.arange(len(train)), test_size=size, stratify=train.labels, random_state=cfg.split_seed)
    except ValueError as exc:  # too few sentences of a label to put some on both sides
        raise KDError(f"config: data.validation_size = {cfg.validation_size:g} cannot be carved from split {train.name!r}: {exc}") from None
    return _subset(train, train.name, np.sort(kept)), _subset(train, f"{train.name}[validation]", np.sort(carved))


def load_splits(cfg: DataConfig) -> Splits:
    """Read and validate the train, validation and eval splits named by ``cfg``; raises KDError on bad data.

    The validation split is ``data.validation_split`` or, when that is null, carved from the
    training split (``carve_validation``). Each split must hold at least two labels: a model trained
    or selected on one class learns nothing a user wants, and its accuracy would still decide the champion.
    """
    train = load_split(cfg, cfg.train_split, cfg.max_train_examples)
    evaluation = load_split(cfg, cfg.eval_split, cfg.max_eval_examples)
    _two_labels(train, cfg)
    _two_labels(evaluation, cfg)
    if cfg.validation_split is None:
        train, validation = carve_validation(train, cfg)
    else:
        try:
            validation = load_split(cfg, cfg.validation_split)
        except KDError as exc:
            raise KDError(f"config: data.validation_split = {cfg.validation_split!r} cannot be read: {exc}") from None
    _two_labels(validation, cfg)
    return Splits(train=train, validation=validation, eval=evaluation)


def load_unlabelled(cfg: DataConfig, split: str, splits: Splits, limit: int | None, seed: int) -> list[str]:
    """Sentences of ``split`` for the teacher to label: only the text column is read; sentences
    that are in any of ``splits`` and repeats are left out; at most ``limit`` of them, a seeded
    draw kept in source order. Raises KDError naming ``distill.transfer.unlabelled_split``."""
    key = f"config: distill.transfer.unlabelled_split = {split!r}"
    try:
        texts = _texts(*_frame(cfg, split), split, {cfg.text_column: "data.text_column"})
    except KDError as exc:
        raise KDError(f"{key} cannot be read: {exc}") from None
    # Leaving out the scored sentences keeps the teacher's answers on them away from the student.
    known = {text for part in (splits.train, splits.validation, splits.eval) for text in part.texts}
    kept = [text for text in dict.fromkeys(texts) if text not in known]
    if not kept:
        raise KDError(f"{key} holds no sentence outside the training, validation and evaluation splits; expected a split with other sentences")
    if limit is not None and limit < len(kept):
        keep = np.sort(np.random.default_rng(seed).choice(len(kept), size=limit, replace=False))
        kept = [kept[i] for i in keep]
    return kept


def _two_labels(split: TextSplit, cfg: DataConfig) -> None:
    present = sorted({int(label) for label in split.labels})
    if len(present) < 2:
        raise KDError(
            f"data: split {split.name!r} of {cfg.source} holds only the label {cfg.label_names[present[0]]!r}; "
            f"expected at least two of {list(cfg.label_names)} (data.label_names)"
        )
