"""Teacher outputs stored once per key: its logits on the splits, and each labelled transfer set.

A folder is named by a hash of its key, and ``key.json`` beside the arrays records the key in
full, so a reader can refuse outputs that were computed for other examples, another order, another
teacher or other settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from kdlib.data import Splits
from kdlib.errors import KDError

ARTIFACT_DIR = "teacher_logits"
TAG = "kd.teacher_logits"  # names the logits artifact on the teacher's run
SECONDS_METRIC = "logits_seconds"  # teacher-run metric: computing the logits every student reads (train and validation)
KEY_FILE, ARRAYS_FILE, INFO_FILE = "key.json", "arrays.npz", "info.json"


def digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def write(folder: Path, key: dict[str, Any], arrays: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> Path:
    """Write ``<folder>/<digest>/{key.json,arrays.npz[,info.json]}``; returns the digest folder."""
    target = folder / digest(key)
    target.mkdir(parents=True, exist_ok=True)
    np.savez(target / ARRAYS_FILE, **arrays)
    (target / KEY_FILE).write_text(json.dumps(key, indent=2, sort_keys=True))
    if info is not None:
        (target / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    return target


def read(folder: Path, expected: dict[str, Any], what: str, hint: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and info stored in ``folder``, after checking the ``expected`` fields of its key.

    ``what`` names the contents and ``hint`` what to do about a mismatch, for the error message.
    """
    try:
        stored = json.loads((folder / KEY_FILE).read_text())
        arrays = np.load(folder / ARRAYS_FILE)
    except (OSError, ValueError) as exc:
        raise KDError(f"{what} at {folder} is missing or unreadable ({exc}); {hint}") from None
    mismatched = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
    if mismatched:
        detail = "; ".join(f"{k}: cached {a!r}, needed {b!r}" for k, (a, b) in mismatched.items())
        raise KDError(f"{what} at {folder} was made for other inputs ({detail}); {hint}")
    info = json.loads((folder / INFO_FILE).read_text()) if (folder / INFO_FILE).is_file() else {}
    return {name: arrays[name] for name in arrays.files}, info


def teacher_key(teacher_model: str, version: str, splits: Splits, tokenizer_fingerprint: str | None = None, max_length: int | None = None) -> dict:
    """What the teacher's cached logits were computed for. Students check the teacher and the data
    (fingerprints cover every example and their order); the tokenizer and max length describe how
    the teacher read them, which a student need not share, so a student leaves them out."""
    key = {
        "teacher_model": teacher_model,
        "teacher_version": str(version),
        **{f"{split}_fingerprint": getattr(splits, split).fingerprint for split in ("train", "validation", "eval")},
    }
    if tokenizer_fingerprint is not None:
        key |= {"tokenizer_fingerprint": tokenizer_fingerprint, "max_length": max_length}
    return key
