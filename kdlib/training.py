"""The one training loop, shared by the teacher and every student trial.

It knows nothing of MLflow or Optuna: per-epoch metrics go to ``on_epoch_end``, which may raise to
stop training (a pruned trial). Device placement and mixed precision come from accelerate. The
loop reads values back from the device only every ``log_every`` steps and at epoch ends.

Progress: a tqdm bar per epoch in a terminal; elsewhere (``mlflow run`` logs, CI, nohup) one line
per epoch that holds what the bar would show (steps, examples/s, elapsed) and the epoch's metrics.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from kdlib import attention, dropout, embedding_gradient, precision, threads
from kdlib.config import TrainConfig
from kdlib.errors import KDError

Batch = dict[str, torch.Tensor]
# (logits [batch, labels], batch) -> (loss to minimise, named parts to report, e.g. KD and CE terms)
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EpochCallback = Callable[[int, dict[str, float]], None]
# validation logits [n, labels] in example order -> named metrics (at least "accuracy" and "loss"), logged as val_<name>
EvalFn = Callable[[np.ndarray], dict[str, float]]
MATRICES = 0  # make_optimizer's group of weight matrices, with weight decay (then biases and LayerNorm weights, without)


def cross_entropy(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return F.cross_entropy(logits.float(), batch["labels"]), {}


class NonFiniteLoss(KDError):
    """The training loss became NaN or infinite."""


@dataclass
class FitResult:
    model: PreTrainedModel  # unwrapped, without mixed-precision hooks, ready to save
    history: list[dict[str, float]] = field(default_factory=list)


def make_accelerator(mixed_precision: str, grad_accum_steps: int = 1) -> Accelerator:
    """An Accelerator in the precision ``mixed_precision`` resolves to on this machine (``kdlib/precision.py``)."""
    mixed_precision = precision.resolve(mixed_precision).mixed_precision
    # accelerate keeps one process-wide state; a new job in the same process (tests, sweeps) may
    # ask for another precision, which that state would otherwise refuse.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum_steps)


def word_embedding_updates(model: torch.nn.Module, cfg: TrainConfig, device: torch.device | None = None, scratch: bool = False) -> str:
    """How ``model``'s word-embedding table trains on ``device`` (accelerate's device when None): dense,
    lazy or frozen, with ``cfg.word_embeddings`` resolved. ``auto`` is lazy on a CPU, where AdamW's pass
    over the whole table is memory-bound and lazy makes the step faster at the same accuracy when
    fine-tuning (reports/results.md, "A leaner student step"). It is dense on an accelerator, where lazy is
    unmeasured and fp16 could not run it, and for a ``scratch`` model, whose random
    rows learn more slowly when a row moves only in the steps that use it. An explicit lazy that cannot run is refused."""
    table = model.get_input_embeddings()
    device = device if device is not None else PartialState().device
    if cfg.word_embeddings == "auto":
        return "lazy" if device.type == "cpu" and isinstance(table, torch.nn.Embedding) and not scratch else "dense"
    if cfg.word_embeddings == "lazy" and not isinstance(table, torch.nn.Embedding):
        raise KDError(f"word_embeddings: lazy needs input embeddings that are a torch.nn.Embedding, not {type(table).__name__}; use dense or frozen")
    if cfg.word_embeddings == "lazy" and precision.resolve(cfg.mixed_precision).mixed_precision == "fp16":
        # fp16's loss scaler unscales, and checks for overflow, only the gradients of the optimizer it steps
        raise KDError(
            "word_embeddings: lazy cannot train in fp16 (mixed_precision resolves to fp16 here); use mixed_precision bf16 or no, or word_embeddings dense"
        )
    return cfg.word_embeddings


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> tuple[torch.optim.Optimizer, embedding_gradient.LazyAdamW | None]:
    """AdamW over the parameters that train, and the word-embedding table's ``LazyAdamW`` where its
    updates are lazy (the table then is not in the first). frozen takes the table out of training here."""
    table = model.get_input_embeddings()
    updates = word_embedding_updates(model, cfg, device)
    if updates == "frozen":
        table.weight.requires_grad_(False)
    lazy = updates == "lazy"
    # No weight decay on biases and LayerNorm weights, as in BERT's original recipe.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad and not (lazy and param is table.weight):
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]  # MATRICES first
    # The fused kernel does the whole update in one pass; CUDA and, since torch 2.4, CPU have it.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused), embedding_gradient.LazyAdamW(table.weight) if lazy else None


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def epoch_line(label: str, epoch: int, epochs: int, steps: int, metrics: dict[str, float], elapsed: float) -> str:
    """One log line per epoch: what a terminal's bar shows, the epoch's metrics, and the time left."""
    shown = ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("train_", "val_")) and k not in ("train_examples_per_s", "train_seconds")
    )
    eta = elapsed / epoch * (epochs - epoch)
    return (
        f"{label}epoch {epoch}/{epochs}: {steps} steps, {shown}, {metrics['train_examples_per_s']:.0f} examples/s, "
        f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}"
    )


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader: torch.utils.data.DataLoader, accelerator: Accelerator) -> np.ndarray:
    """float32 logits [n, labels] in the split's original order (the loader may batch in any order),
    computed in ``accelerator``'s precision, the one the model trained in, whether or not ``model``
    went through ``accelerator.prepare`` (a trained model comes back unwrapped)."""
    model.eval()
    chunks, indices = [], []
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits, index = accelerator.gather_for_metrics((logits, batch["index"]))
        chunks.append(logits.cpu())
        indices.append(index.cpu())
    out = torch.empty((sum(len(c) for c in chunks), chunks[0].shape[1]), dtype=torch.float32)
    out[torch.cat(indices)] = torch.cat(chunks)
    return out.numpy()


def score_evaluation(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, evaluate: EvalFn, mixed_precision: str, val_accuracy: float
) -> tuple[np.ndarray, dict[str, float]]:
    """Logits on the evaluation split, its metrics as eval_<name>, and val_eval_gap: validation minus
    evaluation accuracy. Once per trained model, after every choice that validation made."""
    logits = predict_logits(model, loader, make_accelerator(mixed_precision))
    metrics = {f"eval_{name}": value for name, value in evaluate(logits).items()}
    return logits, {**metrics, "val_eval_gap": val_accuracy - metrics["eval_accuracy"]}


@dataclass(frozen=True)
class Stepper:
    """How a training step clips its gradients, updates the parameters and clears the gradients:
    through the word embeddings' ``RowGradient`` where ``lean_steps`` set one up, else accelerate's
    clipping and freed gradients; with a ``LazyAdamW`` for the table's used rows."""

    accelerator: Accelerator
    rows: embedding_gradient.RowGradient | None = None
    lazy: embedding_gradient.LazyAdamW | None = None

    def update(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """After the backward pass: clip (once the accumulated gradients sync), update, clear."""
        if self.accelerator.sync_gradients:
            self.clip(model, max_norm)
        self.step(optimizer)
        self.clear(optimizer)

    def clip(self, model: torch.nn.Module, max_norm: float) -> None:
        if self.rows is None:
            self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        else:
            self.rows.clip_(model.parameters(), max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()  # accelerate's optimizer steps only when the accumulated gradients sync
        if self.lazy is not None and self.accelerator.sync_gradients:
            # The table is a matrix: it takes the decay group's settings, as it would inside AdamW.
            self.lazy.step(self.rows.used(), optimizer.param_groups[MATRICES])

    def clear(self, optimizer: torch.optim.Optimizer) -> None:
        if self.rows is None:
            optimizer.zero_grad(set_to_none=True)  # accelerate's optimizer keeps them while accumulating
        elif self.accelerator.sync_gradients:
            self.rows.zero_grad(optimizer)


@contextmanager
def lean_steps(model: torch.nn.Module, accelerator: Accelerator, lazy: embedding_gradient.LazyAdamW | None = None) -> Iterator[Stepper]:
    """While training: the CPU's cheaper dropout (``kdlib/dropout.py``) and attention
    (``kdlib/attention.py``), and word-embedding row gradients (``kdlib/embedding_gradient.py``),
    which ``lazy`` (from ``make_optimizer``) needs on every device. Yields how steps clip, update and clear."""
    device = accelerator.device
    with (
        dropout.cpu_dropout(model),
        attention.cpu_attention_while(model, device),
        embedding_gradient.row_gradient(model, device, lazy is not None) as rows,
    ):
        yield Stepper(accelerator, rows, lazy)


def train_epoch(
    model: torch.nn.Module,
    train_loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    loss_fn: LossFn,
    cfg: TrainConfig,
    desc: str,
    stepper: Stepper,
) -> dict[str, float]:
    """One pass over ``train_loader``: the mean loss and its named parts, examples/s and seconds."""
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    part_sums: dict[str, torch.Tensor] = {}
    examples = 0
    started = time.perf_counter()
    # disable=None: no bar when not a TTY (fit then prints one line per epoch)
    bar = tqdm(train_loader, desc=desc, disable=None if accelerator.is_local_main_process else True, leave=False)
    for step, batch in enumerate(bar, start=1):
        threads.take_part()  # a sweep's last trials take the threads of its workers that have none left
        with accelerator.accumulate(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, parts = loss_fn(logits, batch)
            accelerator.backward(loss)
            stepper.update(model, optimizer, cfg.max_grad_norm)
            scheduler.step()
        loss_sum += loss.detach()
        for name, value in parts.items():
            part_sums[name] = part_sums.get(name, 0) + value.detach()
        examples += len(batch["labels"])
        if step % cfg.log_every == 0:
            running = float(loss_sum) / step  # the only host sync inside an epoch
            if not math.isfinite(running):
                raise NonFiniteLoss(f"training loss became {running} in {desc} at step {step}")
            bar.set_postfix(loss=f"{running:.4f}")
    seconds = time.perf_counter() - started
    train_loss = float(loss_sum) / len(train_loader)
    if not math.isfinite(train_loss):
        raise NonFiniteLoss(f"training loss became {train_loss} in {desc}")
    return {
        "train_loss": train_loss,
        **{f"train_{name}": float(value) / len(train_loader) for name, value in part_sums.items()},
        "train_examples_per_s": examples * accelerator.num_processes / seconds,
        "train_seconds": seconds,
    }


def fit(
    model: PreTrainedModel,
    train_loader: torch.utils.data.DataLoader,
    eval_loader: torch.utils.data.DataLoader,
    evaluate: EvalFn,
    cfg: TrainConfig,
    loss_fn: LossFn = cross_entropy,
    on_epoch_end: EpochCallback | None = None,
    label: str = "",
) -> FitResult:
    """Train for ``cfg.epochs``; after each, evaluate and pass the epoch's metrics to ``on_epoch_end``.

    ``label`` starts each progress line (e.g. "teacher: ", "trial 3: ").
    """
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum_steps)
    sampler = train_loader.batch_sampler
    optimizer, lazy = make_optimizer(model, cfg, accelerator.device)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    total = updates_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    result = FitResult(model=model)
    fit_started = time.perf_counter()
    unwrapped = accelerator.unwrap_model(model)
    for epoch in range(1, cfg.epochs + 1):
        if hasattr(sampler, "set_epoch"):  # length-grouped batches reshuffle per epoch
            sampler.set_epoch(epoch)
        desc = f"{label}epoch {epoch}/{cfg.epochs}"
        # Validation runs outside: it scores the model as it will be scored once saved.
        with lean_steps(unwrapped, accelerator, lazy) as stepper:
            metrics = train_epoch(model, train_loader, optimizer, scheduler, accelerator, loss_fn, cfg, desc, stepper)
        evaluation = evaluate(predict_logits(model, eval_loader, accelerator))
        metrics = {**metrics, **{f"val_{name}": value for name, value in evaluation.items()}}
        result.history.append(metrics)
        if not sys.stderr.isatty() and accelerator.is_local_main_process:
            print(epoch_line(label, epoch, cfg.epochs, len(train_loader), metrics, time.perf_counter() - fit_started), flush=True)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    model.zero_grad(set_to_none=True)  # the trained model carries no gradient buffers
    result.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return result
