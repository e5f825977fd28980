"""Benchmark: an exported model's answers on other x86 CPUs against this one's, under CPU emulation.

ONNX Runtime picks its kernels by the CPU's features, and they need not add alike: without VNNI the
int8 kernel adds pairs of products in 16 bits, which 8-bit weights overflow (reports/results.md, "int8 on CPUs
without VNNI"). This runs the model here, then under ``qemu-x86_64 -cpu MODEL`` for each ``--cpu``:
user-mode emulation runs the same Python and wheels, but every CPU feature they detect is the
emulated CPU's, so ONNX Runtime takes that CPU's kernels. Each run scores ``--sentences`` sentences
of the experiment's evaluation split (a seeded sample, as ``data.max_eval_examples`` takes) one per call, as served
(``search/benchmarks/ort_logits.py``), and the table compares logits and answers with this host's.
Emulated, a sentence of the sst2-minilm student took 0.1-0.8 s (reports/results.md): it checks answers, not speed.

    python -m search.benchmarks.cpu_parity --experiment experiments/sst2-minilm.yaml runs:/<export>/onnx_int8 \\
        [--cpu EPYC-Rome --cpu Nehalem] [--sentences 150]

Needs QEMU's user-mode emulator (Debian: ``apt install qemu-user``). Writes
``outputs/bench/<name>-cpu-parity.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from kdlib import registry
from kdlib.configure import build_config
from kdlib.data import load_split
from kdlib.errors import KDError
from kdlib.metrics import accuracy
from kdlib.serving import ONNX_FILE, ONNX_MODEL, UNFUSED, Tokenize
from search.benchmarks.bench import OUT

QEMU = "qemu-x86_64"
# AVX2 without AVX-512 or VNNI (many laptops, AMD EPYC Zen 2 VMs), and SSE4.2 without AVX.
CPUS = ("EPYC-Rome", "Nehalem")
# The features that decide which ONNX Runtime kernels run, as NumPy names them.
SHOWN = ("AVX", "AVX2", "AVX512F", "AVX512VNNI", "AVX512BF16")


def tokens(folder: Path, max_length: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids [sentences, longest] padded with zeros, lengths): each sentence tokenized alone, as served."""
    tokenize = Tokenize(folder, max_length)
    rows = [tokenize([text])[0][0] for text in texts]
    ids = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, np.array([len(row) for row in rows])


def cpu_models(qemu: str) -> set[str]:
    """The CPU models ``qemu -cpu`` takes (``qemu-x86_64 -cpu help``: lines ``x86 NAME  description``)."""
    # No check: having listed them, qemu-user exits 1 for want of a program to run.
    listed = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True).stdout
    return {line.split()[1] for line in listed.splitlines() if line.startswith("x86 ")}


def scored(model: Path, tokens_file: Path, out: Path, prefix: list[str]) -> tuple[np.ndarray, list[str]]:
    """(logits, CPU features seen) of ``ort_logits`` run after ``prefix`` (none: on this CPU)."""
    # By its file, not as a module: it needs no package of the project (and imports none).
    command = [*prefix, sys.executable, str(Path(__file__).with_name("ort_logits.py")), str(model), str(tokens_file), str(out)]
    command += [f"--disable={name}" for name in UNFUSED]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise KDError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    with np.load(out) as result:
        return result["logits"], result["features"].tolist()


def compare(here: np.ndarray, there: np.ndarray, labels: np.ndarray) -> dict:
    """Logits on another CPU (``there``) against this host's."""
    return {
        "largest_logit_difference": float(np.abs(there - here).max()),
        "answers_differ": int((there.argmax(1) != here.argmax(1)).sum()),
        "accuracy_here": accuracy(here, labels),
        "accuracy_there": accuracy(there, labels),
    }


def run(uri: str, experiment: str, cpus: list[str], sentences: int, qemu: str) -> dict:
    """The model's logits here and on each emulated CPU, compared."""
    if shutil.which(qemu) is None:
        raise KDError(f"{qemu} not found; expected QEMU's user-mode emulator on the PATH (Debian: apt install qemu-user)")
    unknown = sorted(set(cpus) - cpu_models(qemu))
    if unknown:
        raise KDError(f"--cpu {', '.join(unknown)}: not a CPU model of {qemu}; expected one that `{qemu} -cpu help` lists, such as {', '.join(CPUS)}")
    cfg = build_config(experiment, {})
    split = load_split(cfg.data, cfg.data.eval_split, sentences)
    with tempfile.TemporaryDirectory(prefix="kd-cpu-parity-") as tmp:
        source = registry.fetch_model(uri, str(Path(tmp) / "model"))
        if source.kind != ONNX_MODEL:
            raise KDError(f"{uri} is a PyTorch model; expected an ONNX model of the export job (runs:/<export run>/onnx_int8 or onnx_optimized)")
        ids, lengths = tokens(source.folder, source.max_length, split.texts)
        tokens_file = Path(tmp) / "tokens.npz"
        np.savez(tokens_file, ids=ids, lengths=lengths)
        model = source.folder / ONNX_FILE
        here, features = scored(model, tokens_file, Path(tmp) / "here.npz", [])
        results = {"model": uri, "sentences": len(split.texts), "split": cfg.data.eval_split, "here": {"features": features}, "cpus": {}}
        for cpu in cpus:
            there, seen = scored(model, tokens_file, Path(tmp) / f"{cpu}.npz", [qemu, "-cpu", cpu])
            results["cpus"][cpu] = {"features": seen, **compare(here, there, split.labels)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{cfg.name}-cpu-parity.json").write_text(json.dumps(results, indent=2))
    return results


def markdown(results: dict) -> str:
    def shown(features: list[str]) -> str:
        return ", ".join(f"{name} {'yes' if name in features else 'no'}" for name in SHOWN)

    rows = [
        f"{results['model']} on {results['sentences']} sentences of {results['split']}, one per call; this host: {shown(results['here']['features'])}",
        "",
        "| emulated CPU | its features | largest logit difference against this host | answers that differ | accuracy here / there |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cpu, side in results["cpus"].items():
        rows.append(
            f"| {cpu} | {shown(side['features'])} | {side['largest_logit_difference']:.2g} | {side['answers_differ']} "
            f"| {side['accuracy_here']:.4f} / {side['accuracy_there']:.4f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.benchmarks.cpu_parity", description=__doc__.splitlines()[0])
    parser.add_argument("uri", help="an ONNX model of the export job: runs:/<export run>/onnx_int8")
    parser.add_argument("--experiment", required=True, help="its data.source and eval split give the sentences")
    parser.add_argument("--cpu", action="append", help=f"a CPU model of {QEMU} (default: {' and '.join(CPUS)})")
    parser.add_argument("--sentences", type=int, default=150, help="a seeded sample of N sentences of the eval split (more than it holds: all)")
    parser.add_argument("--qemu", default=QEMU, help="the emulator to run")
    args = parser.parse_args(argv)
    try:
        print(markdown(run(args.uri, args.experiment, args.cpu or list(CPUS), args.sentences, args.qemu)))
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
