"""Benchmark: batch-1 latency of several served models, which take the same sentences in turn.

On a shared host the speed drifts by tens of percent within a minute, so models timed one after
another (as separate evaluate runs are) can swap places. Here the models take turns every
``--block`` sentences, so a drift slows them alike and their ratios hold. Each model is served by
its own process, which waits while the others take their turn: an idle second ONNX Runtime session
in the same process raised a model's p50 by 18% (0.81 to 0.95 ms), and PyTorch's spinning threads
slowed the next model's calls from 4.4 ms to 60. Turns are long: after its turn a process's threads
spin on, and on 2 cores the next model's first calls stalled for about 5 ms each (turns of 50
sentences put every model's p95 at 5 ms; turns of 500 at 1.8).
Each model runs through the backend that serves it (``kdlib/serving.py``), from raw strings,
tokenization included, as evaluate times it.

    python -m search.benchmarks.serve_latency --experiment experiments/sst2-minilm.yaml \\
        runs:/<one export>/onnx_int8 runs:/<another export>/onnx_int8 models:/sst2-minilm-student@champion
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdlib import registry
from kdlib.configure import build_config
from kdlib.data import load_split
from kdlib.errors import KDError
from kdlib.inference import batch1_times, load_backend, sentence_stream

SETTLE = 5  # untimed calls at the start of each turn, while the last model's threads wind down


def _serve(uri: str, texts: list[str], connection) -> None:
    """One model's process: load it, then time each (start, calls) turn it is sent until it gets None."""
    with tempfile.TemporaryDirectory(prefix="kd-serve-latency-") as tmp:
        backend = load_backend(registry.fetch_model(uri, str(Path(tmp) / "model")), "fp32", torch.get_num_threads())
    pick = sentence_stream(texts)
    while (turn := connection.recv()) is not None:
        start, calls = turn
        batch1_times(backend, pick, start, SETTLE)
        connection.send(batch1_times(backend, pick, start, calls))


def turns(calls: int, warmup: int, block: int) -> list[tuple[int, int]]:
    """(first sentence, sentences) of each turn: a warm-up, then ``calls`` sentences in blocks."""
    return [(0, warmup)] + [(start, min(block, calls - start)) for start in range(0, calls, block)]


def in_turn(uris: list[str], texts: list[str], calls: int, warmup: int, block: int) -> list[list[float]]:
    """Seconds of each model's one-sentence calls on the same ``calls`` sentences, in the order of
    ``uris``, the models taking turns every ``block``. A URI given twice is served twice, by two
    processes: the spread between the two is the host's noise."""
    spawn = multiprocessing.get_context("spawn")
    pipes = [spawn.Pipe() for _ in uris]
    workers = [spawn.Process(target=_serve, args=(uri, texts, theirs), daemon=True) for uri, (_, theirs) in zip(uris, pipes, strict=True)]
    for worker, (_, theirs) in zip(workers, pipes, strict=True):
        worker.start()
        theirs.close()  # so a worker that dies ends our wait on it
    try:
        times: list[list[float]] = [[] for _ in uris]
        for index, turn in enumerate(turns(calls, warmup, block)):
            for uri, (ours, _), timed_so_far in zip(uris, pipes, times, strict=True):
                ours.send(turn)
                try:
                    timed = ours.recv()
                except (EOFError, ConnectionError):
                    raise KDError(
                        f"serve_latency: the process serving {uri} ended early (its error is above); expected a model URI it can load"
                    ) from None
                if index:  # the first turn warms up
                    timed_so_far += timed
        for ours, _ in pipes:
            ours.send(None)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m search.benchmarks.serve_latency", description=__doc__.splitlines()[0])
    parser.add_argument("uris", nargs="+", help="model URIs (PyTorch models run in fp32)")
    parser.add_argument("--experiment", required=True, help="its data.source and eval split give the sentences")
    parser.add_argument("--calls", type=int, default=2000, help="timed sentences per model")
    parser.add_argument("--warmup", type=int, help="untimed calls per model first (default: the experiment's evaluate.warmup)")
    parser.add_argument("--block", type=int, default=500, help="sentences per turn")
    args = parser.parse_args(argv)
    cfg = build_config(args.experiment, {})
    texts = load_split(cfg.data, cfg.data.eval_split, cfg.data.max_eval_examples).texts
    warmup = cfg.evaluate.warmup if args.warmup is None else args.warmup
    times = in_turn(args.uris, texts, args.calls, warmup, args.block)
    first = np.median(times[0])
    print(
        f"batch-1 latency, {args.calls} sentences of {cfg.data.eval_split}, models taking turns every {args.block}, {torch.get_num_threads()} threads"
    )
    print("| model | sentences | p50 ms | p95 ms | p50 against the first |\n| --- | --- | --- | --- | --- |")
    for uri, seconds in zip(args.uris, times, strict=True):
        p50, p95 = np.percentile(np.array(seconds) * 1e3, [50, 95])
        print(f"| {uri} | {len(seconds)} | {p50:.3f} | {p95:.3f} | {p50 / (first * 1e3):.2f} |")


if __name__ == "__main__":
    main()
