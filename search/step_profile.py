"""Where one student training step's time goes: data, forward, backward, gradient clipping, optimizer.

A benchmark, not a job: the 3-layer student cut from the sst2-minilm teacher (pretrained weights and
a random head, which costs the same as a trained one), batches of 32 as a sweep trains them, the KD
loss against random soft targets, in the precision ``auto`` picks. Each setting runs twice,
alternating, so a slow spell of the host shows as disagreement between the two runs.

    python -m search.step_profile            # from the project root; needs ../shared (see README)
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdlib import batching
from kdlib.config import DataConfig, TrainConfig
from kdlib.data import load_splits
from kdlib.losses import kd_loss
from kdlib.models import Classifier, cut_from_teacher
from kdlib.training import make_accelerator, make_optimizer

TEACHER = "../shared/models/all-MiniLM-L6-v2"
STEPS, WARMUP = 120, 20


def profile(teacher: Classifier, encoded: batching.Encoded, frozen: bool) -> dict[str, float]:
    """Seconds per part, summed over the timed steps, and the number of timed steps."""
    model = cut_from_teacher(teacher, (0, 2, 4)).model.train()
    cfg = TrainConfig(learning_rate=1e-4, freeze_word_embeddings=frozen)
    if frozen:
        model.get_input_embeddings().weight.requires_grad_(False)
    accelerator = make_accelerator(cfg.mixed_precision)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, cfg, accelerator.device))
    targets = torch.randn(len(encoded), 2)
    batches = iter(batching.train_loader(encoded, teacher.tokenizer.pad_token_id, cfg.batch_size, 0))
    parts = dict.fromkeys(("data", "forward", "backward", "clip", "optimizer"), 0.0)
    for step in range(STEPS):
        marks = [time.perf_counter()]
        batch = next(batches)
        marks.append(time.perf_counter())
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _, _ = kd_loss(logits, targets[batch["index"]], batch["labels"], 4.0, 0.5)
        marks.append(time.perf_counter())
        accelerator.backward(loss)
        marks.append(time.perf_counter())
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if step >= WARMUP:
            for name, start, end in zip(parts, marks, marks[1:], strict=True):
                parts[name] += end - start
    return {**parts, "steps": STEPS - WARMUP}


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    teacher = Classifier(tokenizer, AutoModelForSequenceClassification.from_pretrained(TEACHER, num_labels=2))
    splits = load_splits(DataConfig(source="../shared/data/sst2", max_train_examples=8000))
    encoded = batching.encode(splits.train, tokenizer, 128, ".kdcache")
    for frozen in (False, True, False, True):
        parts = profile(teacher, encoded, frozen)
        steps = parts.pop("steps")
        total = sum(parts.values())
        shares = ", ".join(f"{name} {1e3 * spent / steps:.1f} ms ({spent / total:.0%})" for name, spent in parts.items())
        print(f"freeze_word_embeddings={frozen}: {1e3 * total / steps:.1f} ms/step, {32 * steps / total:.0f} examples/s; {shares}", flush=True)


if __name__ == "__main__":
    main()
