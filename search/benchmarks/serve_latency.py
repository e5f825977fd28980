"""Benchmark: batch-1 latency of several served models, which take the same sentences in turn.

On a shared host the speed drifts by tens of percent within a minute, so models timed one after
another (as separate evaluate runs are) can swap places. Here the models take turns every
``--block`` sentences, so a drift slows them alike and their ratios hold. Turns are blocks, not
single calls: after a call, ONNX Runtime's and PyTorch's worker threads spin for a while waiting for
more work, and on 2 cores they would slow the next model's call (PyTorch's 4.4 ms became 60).
Each model runs through the backend that serves it (``kdlib/serving.py``), from raw strings,
tokenization included, as evaluate times it.

    python -m search.benchmarks.serve_latency --experiment experiments/sst2-minilm.yaml \\
        runs:/<one export>/onnx_int8 runs:/<another export>/onnx_int8 models:/sst2-minilm-student@champion
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdlib import registry
from kdlib.configure import build_config
from kdlib.data import load_split
from kdlib.inference import batch1_times, load_backend, sentence_stream


def in_turn(uris: list[str], texts: list[str], calls: int, warmup: int, block: int) -> dict[str, list[float]]:
    """Seconds of each model's one-sentence calls on the same ``calls`` sentences, the models taking turns every ``block``."""
    with tempfile.TemporaryDirectory(prefix="kd-serve-latency-") as tmp:
        backends = {
            uri: load_backend(registry.fetch_model(uri, str(Path(tmp) / str(i))), "fp32", torch.get_num_threads()) for i, uri in enumerate(uris)
        }
        pick = sentence_stream(texts)
        for backend in backends.values():
            batch1_times(backend, pick, 0, warmup)
        times: dict[str, list[float]] = {uri: [] for uri in uris}
        for start in range(0, calls, block):
            for uri, backend in backends.items():
                batch1_times(backend, pick, start, 1)  # while the last model's threads stop spinning
                times[uri] += batch1_times(backend, pick, start, min(block, calls - start))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m search.benchmarks.serve_latency", description=__doc__.splitlines()[0])
    parser.add_argument("uris", nargs="+", help="model URIs (PyTorch models run in fp32)")
    parser.add_argument("--experiment", required=True, help="its data.source and eval split give the sentences")
    parser.add_argument("--calls", type=int, default=1000, help="timed sentences per model")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls per model first")
    parser.add_argument("--block", type=int, default=50, help="sentences per turn")
    args = parser.parse_args(argv)
    cfg = build_config(args.experiment, {})
    texts = load_split(cfg.data, cfg.data.eval_split, cfg.data.max_eval_examples).texts
    times = in_turn(args.uris, texts, args.calls, args.warmup, args.block)
    first = np.median(times[args.uris[0]])
    print(
        f"batch-1 latency, {args.calls} sentences of {cfg.data.eval_split}, models taking turns every {args.block}, {torch.get_num_threads()} threads"
    )
    print("| model | p50 ms | p95 ms | p50 against the first |\n| --- | --- | --- | --- |")
    for uri, seconds in times.items():
        p50, p95 = np.percentile(np.array(seconds) * 1e3, [50, 95])
        print(f"| {uri} | {p50:.3f} | {p95:.3f} | {p50 / (first * 1e3):.2f} |")


if __name__ == "__main__":
    main()
