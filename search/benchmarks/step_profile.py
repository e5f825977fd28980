"""Where one student training step's time goes: data, forward, backward, gradient clipping, optimizer.

A benchmark, not a job: the 3-layer student cut from the sst2-minilm teacher (pretrained weights and
a random head, which costs the same as a trained one), batches of 32 as a sweep trains them, the KD
loss against random soft targets, in the precisions asked for (default ``auto``). Each setting runs ``--rounds`` times,
alternating, so a slow spell of the host shows as disagreement between the runs.

    python -m search.benchmarks.step_profile            # from the project root; needs ../shared (see README)
    python -m search.benchmarks.step_profile --precision auto bf16 --word-embeddings dense --loop kdlib --steps 40   # auto against explicit bf16
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdlib import batching, precision
from kdlib.config import WORD_EMBEDDINGS, DataConfig, TrainConfig
from kdlib.data import load_splits
from kdlib.losses import kd_loss
from kdlib.models import Classifier, cut_from_teacher
from kdlib.training import Stepper, lean_steps, make_accelerator, make_optimizer, word_embedding_updates

TEACHER = "../shared/models/all-MiniLM-L6-v2"
WARMUP = 20  # untimed steps: the first steps of a fresh model are slower


def profile(
    teacher: Classifier, encoded: batching.Encoded, word_embeddings: str, loop: str, mixed_precision: str, steps: int
) -> dict[str, float | str]:
    """Seconds per part, summed over the timed steps, the number of timed steps and the word-embedding
    updates that ``word_embeddings`` resolved to. ``loop``: "kdlib" steps as ``kdlib.training.fit``
    does (``lean_steps``: its CPU dropout, attention and word-embedding row gradients), "torch" with torch's dropout and attention and dense gradients freed every step (the loop before those)."""
    model = cut_from_teacher(teacher, (0, 2, 4)).model.train()
    cfg = TrainConfig(learning_rate=1e-4, word_embeddings=word_embeddings, mixed_precision=mixed_precision)
    accelerator = make_accelerator(cfg.mixed_precision)
    updates = word_embedding_updates(model, cfg, accelerator.device)
    optimizer, lazy = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    targets = torch.randn(len(encoded), 2)
    batches = iter(batching.train_loader(encoded, teacher.tokenizer.pad_token_id, cfg.batch_size, 0))
    parts = dict.fromkeys(("data", "forward", "backward", "clip", "optimizer"), 0.0)
    with lean_steps(model, accelerator, lazy) if loop == "kdlib" else contextlib.nullcontext(Stepper(accelerator)) as stepper:
        for step in range(WARMUP + steps):
            _timed_step(model, optimizer, accelerator, batches, targets, cfg, stepper, parts if step >= WARMUP else None)
    return {**parts, "steps": steps, "updates": updates}


def _timed_step(model, optimizer, accelerator, batches, targets, cfg: TrainConfig, stepper: Stepper, parts: dict[str, float] | None) -> None:
    """One KD training step; adds each part's seconds to ``parts`` unless it is None (a warm-up step)."""
    marks = [time.perf_counter()]
    batch = next(batches)
    marks.append(time.perf_counter())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, _, _ = kd_loss(logits, targets[batch["index"]], batch["labels"], 4.0, 0.5)
    marks.append(time.perf_counter())
    accelerator.backward(loss)
    marks.append(time.perf_counter())
    stepper.clip(model, cfg.max_grad_norm)
    marks.append(time.perf_counter())
    stepper.step(optimizer)
    stepper.clear(optimizer)
    marks.append(time.perf_counter())
    if parts is not None:
        for name, start, end in zip(parts, marks[:-1], marks[1:], strict=True):
            parts[name] += end - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m search.benchmarks.step_profile", description="Where a student training step's time goes.")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "bf16", "no"], help="train.mixed_precision values")
    parser.add_argument("--word-embeddings", nargs="+", default=list(WORD_EMBEDDINGS), choices=WORD_EMBEDDINGS, help="word_embeddings values")
    parser.add_argument(
        "--loop",
        nargs="+",
        default=["torch", "kdlib"],
        choices=["torch", "kdlib"],
        help="step as kdlib's loop does, or as the loop before it did: torch's dropout and attention and dense gradients, dense word-embedding updates only",
    )
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every setting, alternating")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    teacher = Classifier(tokenizer, AutoModelForSequenceClassification.from_pretrained(TEACHER, num_labels=2))
    splits = load_splits(DataConfig(source="../shared/data/sst2", max_train_examples=8000))
    encoded = batching.encode(splits.train, tokenizer, 128, ".kdcache")
    settings = [
        (chosen, table, loop)
        for chosen in args.precision
        for table in args.word_embeddings
        for loop in args.loop
        if loop == "kdlib" or table == "dense"
    ]
    for chosen, table, loop in settings * args.rounds:
        parts = profile(teacher, encoded, table, loop, chosen, args.steps)
        steps, updates = parts.pop("steps"), parts.pop("updates")
        total = sum(parts.values())
        shares = ", ".join(f"{name} {1e3 * spent / steps:.1f} ms ({spent / total:.0%})" for name, spent in parts.items())
        resolved = precision.resolve(chosen).mixed_precision
        print(
            f"mixed_precision={chosen} ({resolved}) word_embeddings={table} ({updates}) loop={loop}: "
            f"{1e3 * total / steps:.1f} ms/step, "
            f"{32 * steps / total:.0f} examples/s; {shares}",
            flush=True,
        )


if __name__ == "__main__":
    main()
