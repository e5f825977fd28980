"""Benchmark: student training examples/s and trials per hour with 1 to k trials sharing one device.

A prepared script for a lent GPU, where no model weights or data can travel: students are built from
a ``BertConfig`` with random weights (which train at the speed of pretrained ones) in two shapes, the
sst2-minilm student (3 layers, hidden 384) and bert-base (12 layers, hidden 768), and trained with
the KD loss on random token ids of SST-2-like lengths (log-normal around 10 wordpieces), in batches
of 32 grouped by length as a sweep trains them, in the precision ``auto`` picks. For each k, k
processes build their student, warm up, wait for each other, then time ``--steps`` steps; the
device's examples/s is the sum over them, and trials per hour divide it by one trial's examples
(``--trial-examples``: by default 7,200 sentences x 2 epochs, a trial of the 8,000-sentence
benchmark). On a CPU the threads are split between the k processes, as ``search.workers`` does.

    python -m search.benchmarks.share_bench                                   # both shapes, 1, 2 and 4 trials
    python -m search.benchmarks.share_bench --shapes minilm3 --shares 1 2 --steps 50 --out $OUT/share.json
    python -m search.benchmarks.share_bench --word-embeddings dense lazy     # also with lazy table updates (not in fp16)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdlib import batching, precision
from kdlib.config import WORD_EMBEDDINGS, TrainConfig
from kdlib.losses import kd_loss
from kdlib.training import Stepper, lean_steps, make_accelerator, make_optimizer

SHAPES = {
    "minilm3": {"hidden_size": 384, "num_hidden_layers": 3, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
VOCAB = 30522  # BERT's uncased WordPiece vocabulary
BATCH = 32


def sentences(n: int, seed: int) -> batching.Encoded:
    """``n`` random sentences of SST-2-like wordpiece lengths, [CLS] ... [SEP] included."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(10), 0.7, n)), 1, 62).astype(int) + 2
    ids = [rng.integers(1000, VOCAB, size=length, dtype=np.int32) for length in lengths]
    return batching.Encoded(ids, rng.integers(0, 2, size=n))


def _trial(shape: dict, word_embeddings: str, steps: int, warmup: int, threads: int, seed: int, ready, results) -> None:
    """One trial's process: build, warm up, wait for the others, time ``steps`` steps, report examples/s."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, num_labels=2, **shape))
    cfg = TrainConfig(learning_rate=1e-4, word_embeddings=word_embeddings)
    accelerator = make_accelerator(cfg.mixed_precision)
    device = accelerator.device
    optimizer, lazy = make_optimizer(model, cfg, device)
    model, optimizer = accelerator.prepare(model.train(), optimizer)
    encoded = sentences((warmup + steps) * BATCH, seed)
    targets = torch.randn(len(encoded), 2)
    batches = iter(batching.train_loader(encoded, 0, BATCH, seed))

    def step(stepper: Stepper) -> None:
        batch = {key: value.to(device, non_blocking=True) for key, value in next(batches).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _, _ = kd_loss(logits, targets[batch["index"].cpu()].to(device), batch["labels"], 4.0, 0.5)
        accelerator.backward(loss)
        stepper.update(model, optimizer, cfg.max_grad_norm)

    with lean_steps(model, accelerator, lazy) as stepper:  # as kdlib's training loop steps
        for _ in range(warmup):
            step(stepper)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ready.wait()  # every process starts timing together, so the k trials truly share the device
        started = time.perf_counter()
        for _ in range(steps):
            step(stepper)
        if device.type == "cuda":
            torch.cuda.synchronize()
    results.put(steps * BATCH / (time.perf_counter() - started))


def measure(shape: dict, shares: int, steps: int, warmup: int, word_embeddings: str = TrainConfig.word_embeddings) -> list[float]:
    """Examples/s of each of ``shares`` trial processes training at once on this machine's device,
    updating their word embeddings as ``word_embeddings`` says (``TrainConfig.word_embeddings``)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    ready, results = context.Barrier(shares), context.Queue()
    threads = max(1, (os.cpu_count() or 1) // shares)
    processes = [
        context.Process(target=_trial, args=(shape, word_embeddings, steps, warmup, threads, seed, ready, results)) for seed in range(shares)
    ]
    for process in processes:
        process.start()
    rates: list[float] = []
    try:
        while len(rates) < shares:
            try:
                rates.append(results.get(timeout=5))
            except queue.Empty:
                failed = [process.exitcode for process in processes if process.exitcode]
                if failed:  # the others would wait for it at the barrier for ever
                    raise RuntimeError(f"a trial process exited with status {failed[0]}") from None
    finally:
        for process in processes:
            if len(rates) < shares:
                process.terminate()
            process.join()
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m search.benchmarks.share_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--shares", nargs="+", type=int, default=[1, 2, 4], help="trials sharing the device at once")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per trial process")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--word-embeddings", nargs="+", default=[TrainConfig.word_embeddings], choices=WORD_EMBEDDINGS, help="word_embeddings values")
    parser.add_argument("--trial-examples", type=int, default=7200 * 2, help="examples one trial trains on")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "bench" / "share.json")
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"
    chosen = precision.resolve(TrainConfig().mixed_precision)
    print(f"device: {device}; precision {chosen.mixed_precision} ({chosen.reason})", flush=True)
    print(f"| shape | word embeddings | trials at once | examples/s (sum) | trials per hour | against {args.shares[0]} at once |", flush=True)
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    rows = []
    for name in args.shapes:
        for table in args.word_embeddings:
            alone = None
            for shares in args.shares:
                total = sum(measure(SHAPES[name], shares, args.steps, args.warmup, table))
                alone = alone or total
                rows.append(
                    {
                        "shape": name,
                        "word_embeddings": table,
                        "shares": shares,
                        "examples_per_s": total,
                        "trials_per_hour": total * 3600 / args.trial_examples,
                    }
                )
                print(f"| {name} | {table} | {shares} | {total:.0f} | {rows[-1]['trials_per_hour']:.1f} | {total / alone:.2f}x |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "precision": chosen.mixed_precision, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
