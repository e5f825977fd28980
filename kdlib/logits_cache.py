"""Teacher logits stored once per (teacher model version, data, tokenizer, max length).

The folder name is a hash of that key, and ``key.json`` beside the arrays records it in full, so a
reader can refuse a cache that was computed for other examples, another order or another teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kdlib.errors import KDError

ARTIFACT_DIR = "teacher_logits"
TAG = "kd.teacher_logits"  # names the logits artifact on the teacher's run


@dataclass(frozen=True)
class LogitsKey:
    teacher_model: str  # registered model name
    teacher_version: str
    train_fingerprint: str
    dev_fingerprint: str
    tokenizer_fingerprint: str
    max_length: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def write(folder: Path, key: LogitsKey, train: np.ndarray, dev: np.ndarray) -> Path:
    """Write ``<folder>/<digest>/{key.json,logits.npz}``; returns the digest folder."""
    target = folder / key.digest
    target.mkdir(parents=True, exist_ok=True)
    np.savez(target / "logits.npz", train=train.astype(np.float32), dev=dev.astype(np.float32))
    (target / "key.json").write_text(json.dumps(asdict(key), indent=2, sort_keys=True))
    return target


def read(folder: Path, expected: dict[str, str | int]) -> tuple[np.ndarray, np.ndarray]:
    """The cached (train, dev) logits, after checking the ``expected`` fields of their key.

    Students check the teacher and the data (fingerprints cover every example and their order);
    the tokenizer and max length describe how the teacher read them, which a student need not share.
    """
    try:
        stored = LogitsKey(**json.loads((folder / "key.json").read_text()))
    except (OSError, TypeError, ValueError) as exc:
        raise KDError(f"teacher logits cache at {folder} is missing or unreadable ({exc}); rerun the teacher entry point") from None
    mismatched = {k: (getattr(stored, k), v) for k, v in expected.items() if getattr(stored, k) != v}
    if mismatched:
        detail = "; ".join(f"{k}: cached {a!r}, needed {b!r}" for k, (a, b) in mismatched.items())
        raise KDError(
            f"teacher logits cache at {folder} was made for other inputs ({detail}); rerun the teacher entry point on this data (same data.source, splits and max_*_examples)"
        )
    arrays = np.load(folder / "logits.npz")
    return arrays["train"], arrays["dev"]
