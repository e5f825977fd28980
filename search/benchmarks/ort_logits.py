"""One ONNX model's logits, one sentence per call as served, and the CPU features this process sees.

``cpu_parity`` runs it here and under an emulated CPU. It imports NumPy and ONNX Runtime alone, since
every import costs tens of times more emulated, and takes its sentences as wordpiece ids (the
tokenizer's answer does not depend on the CPU).

    python search/benchmarks/ort_logits.py MODEL.onnx TOKENS.npz OUT.npz [--disable OPTIMIZER ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from numpy._core._multiarray_umath import __cpu_features__


def logits(model: str, ids: np.ndarray, lengths: np.ndarray, disabled: list[str]) -> np.ndarray:
    """[sentences, labels] logits; sentence i is ``ids[i, :lengths[i]]``, run alone (no padding, mask all ones)."""
    # The session as kdlib.serving.OrtBackend opens it on a CPU by default (ONNX Runtime's threads).
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    rows = []
    for row, length in zip(ids, lengths, strict=True):
        sentence = row[None, :length]
        rows.append(session.run(["logits"], {"input_ids": sentence, "attention_mask": np.ones_like(sentence)})[0][0])
    return np.array(rows, dtype=np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("tokens", help="an .npz with ids [sentences, longest] and lengths [sentences]")
    parser.add_argument("out")
    parser.add_argument("--disable", action="append", default=[], metavar="OPTIMIZER")
    args = parser.parse_args(argv)
    tokens = np.load(args.tokens)
    features = sorted(name for name, present in __cpu_features__.items() if present)
    np.savez(args.out, logits=logits(args.model, tokens["ids"], tokens["lengths"], args.disable), features=np.array(features))


if __name__ == "__main__":
    main()
