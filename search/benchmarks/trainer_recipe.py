"""The Hugging Face Trainer recipe for the same sweep: the baseline of ``search/benchmarks/side_by_side.py``.

What a user writes without this project, after the KD recipe of the transformers docs and blog
posts: a ``Trainer`` whose ``compute_loss`` runs the teacher online on every batch,
``DataCollatorWithPadding`` for dynamic padding, ``hyperparameter_search(backend="optuna")`` over a
``model_init``, and ``report_to="mlflow"``. It shares with the project only what keeps the
comparison fair: the splits, the registered teacher, the student's initial weights, the loss
formula (``kdlib.losses.kd_loss``), the search space, the sampler's seed, the pruner and the
precision. Its MLflow runs go to the experiment ``<name>-trainer-recipe``, where, in the Trainer's
naming, ``eval_accuracy`` is the validation split's.

Teacher and student must share one tokenizer: the recipe feeds the teacher the student's token ids.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import optuna
import torch
from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments
from transformers.integrations import MLflowCallback

from kdlib import batching, precision, registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.data import TextSplit, load_splits
from kdlib.errors import KDError
from kdlib.losses import kd_loss
from kdlib.metrics import accuracy
from kdlib.models import SCRATCH, cut_from_teacher, load_classifier
from kdlib.student import EVAL_LOGITS, fetch_teacher
from search.space import suggest
from search.study import TrialDraws, make_pruner

# The searched config keys the recipe can set, and the TrainingArguments field each one sets.
ARGUMENTS = {
    "distill.temperature": "temperature",
    "distill.alpha": "alpha",
    "distill.train.learning_rate": "learning_rate",
    "distill.train.epochs": "num_train_epochs",
    "distill.train.batch_size": "per_device_train_batch_size",
    "distill.train.weight_decay": "weight_decay",
}


@dataclass
class DistillationArguments(TrainingArguments):
    """TrainingArguments with the two KD settings, so hyperparameter_search can set them per trial."""

    temperature: float = 1.0
    alpha: float = 0.5


class DistillationTrainer(Trainer):
    """The KD loss with the teacher online; each finished trial scored once on the evaluation split."""

    def __init__(self, *args, teacher: torch.nn.Module, evaluation: Dataset, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        self.evaluation = evaluation
        self.finished: dict[int, tuple[float, float]] = {}  # Optuna trial number -> (validation, evaluation) accuracy
        self.eval_logits: dict[int, np.ndarray] = {}  # Optuna trial number -> its evaluation-split logits, in split order

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        loss, _, _ = kd_loss(outputs.logits, teacher_logits, labels, self.args.temperature, self.args.alpha)
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, trial=None, **kwargs):
        # The stock MLflowCallback opens its run once per object, so every trial after the first would
        # log into a run it starts implicitly, without params. Resetting it gives each trial its own
        # run. (Replacing the callback instead would end the recipe's parent run: the old object's
        # __del__ ends whatever run is active.)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, MLflowCallback):
                callback._initialized = False
        if trial is not None:
            self.args.run_name = f"trial-{trial.number}"
        output = super().train(*args, trial=trial, **kwargs)
        if trial is not None:  # a pruned trial raised TrialPruned above and is not scored
            scored = self.predict(self.evaluation, metric_key_prefix="test")
            self.finished[trial.number] = (self.objective, scored.metrics["test_accuracy"])
            self.eval_logits[trial.number] = scored.predictions
        return output


@dataclass(frozen=True)
class RecipeResult:
    run_id: str  # the recipe's parent MLflow run; each trial is a run nested under it
    sampled: dict[int, dict]  # Optuna trial number -> its settings, by config key
    finished: dict[int, tuple[float, float]]  # trial number -> (validation, evaluation) accuracy; pruned trials absent

    @property
    def best_trial(self) -> int | None:
        """The finished trial with the best validation accuracy (the first of equals, as Optuna picks)."""
        return max(self.finished, key=lambda number: (self.finished[number][0], -number)) if self.finished else None


def check(cfg: ExperimentConfig) -> None:
    """What the recipe cannot do, refused before anything runs."""
    for key in cfg.search.space:
        if key not in ARGUMENTS:
            raise KDError(f"config: search.space.{key}: the Trainer recipe cannot search it; expected only keys among {', '.join(ARGUMENTS)}")
    transfer = cfg.distill.transfer
    for key, value in (("copies", transfer.copies), ("unlabelled_split", transfer.unlabelled_split)):
        if value:
            raise KDError(
                f"config: distill.transfer.{key} = {value!r}: the Trainer recipe has no transfer set; "
                "expected distill.transfer.copies = 0 and distill.transfer.unlabelled_split = null for a side-by-side run"
            )
    if cfg.distill.train.word_embeddings == "frozen":
        # lazy updates train the same parameters as the recipe's AdamW (a row moves when a step used it); frozen trains fewer
        raise KDError(
            "config: distill.train.word_embeddings = 'frozen': the Trainer recipe trains the word embeddings; "
            "expected 'auto', 'dense' or 'lazy' for a side-by-side run"
        )
    if not cfg.student.teacher_layers:
        names = (cfg.student.name_or_path, cfg.teacher.name_or_path)
        if SCRATCH in names or batching.tokenizer_fingerprint(AutoTokenizer.from_pretrained(names[0])) != batching.tokenizer_fingerprint(
            AutoTokenizer.from_pretrained(names[1])
        ):
            raise KDError(
                "student: the Trainer recipe feeds the teacher the student's token ids, so teacher and student need one tokenizer; "
                "expected student.teacher_layers or a pretrained student with the teacher's tokenizer"
            )


def _dataset(split: TextSplit, tokenizer, max_length: int) -> Dataset:
    rows = Dataset.from_dict({"text": split.texts, "label": split.labels.tolist()})
    return rows.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length), batched=True, remove_columns=["text"])


def _accuracy(prediction) -> dict[str, float]:
    return {"accuracy": accuracy(prediction.predictions, prediction.label_ids)}


def run_recipe(cfg: ExperimentConfig, teacher_version: str) -> RecipeResult:
    """The recipe's sweep of ``cfg.search.n_trials`` trials with version ``teacher_version`` of the
    experiment's registered teacher, in a new run of the MLflow experiment ``<name>-trainer-recipe``.
    The caller runs ``check(cfg)`` first, before any other work it times."""
    train_cfg = cfg.distill.train
    chosen = precision.resolve(train_cfg.mixed_precision).mixed_precision
    splits = load_splits(cfg.data)
    sampled: dict[int, dict] = {}

    def hp_space(trial: optuna.Trial) -> dict:
        sampled[trial.number] = suggest(trial, cfg)
        return {ARGUMENTS[key]: value for key, value in sampled[trial.number].items()}

    with tempfile.TemporaryDirectory(prefix="kd-recipe-") as tmp:
        teacher = fetch_teacher(cfg, registry.teacher_model_name(cfg), teacher_version, tmp)

        def model_init() -> torch.nn.Module:
            if cfg.student.teacher_layers:
                return cut_from_teacher(teacher, cfg.student.teacher_layers).model
            return load_classifier("student", cfg.student, cfg.data.label_names, [], cfg.data.max_length, train_cfg.seed).model

        tokenizer = teacher.tokenizer
        args = DistillationArguments(
            output_dir=tmp,
            temperature=cfg.distill.temperature,
            alpha=cfg.distill.alpha,
            learning_rate=train_cfg.learning_rate,
            num_train_epochs=float(train_cfg.epochs),
            per_device_train_batch_size=train_cfg.batch_size,
            per_device_eval_batch_size=train_cfg.eval_batch_size,
            weight_decay=train_cfg.weight_decay,
            warmup_steps=train_cfg.warmup_ratio,  # below 1: a share of the steps
            max_grad_norm=train_cfg.max_grad_norm,
            gradient_accumulation_steps=train_cfg.grad_accum_steps,
            seed=train_cfg.seed,
            use_cpu=not torch.cuda.is_available(),  # the Trainer refuses bf16 on a CPU unless told
            bf16=chosen == "bf16",
            fp16=chosen == "fp16",
            eval_strategy="epoch",
            logging_strategy="epoch",
            save_strategy="no",
            report_to=["mlflow"],
            disable_tqdm=True,
        )
        trainer = DistillationTrainer(
            model_init=model_init,
            args=args,
            train_dataset=_dataset(splits.train, tokenizer, cfg.data.max_length),
            eval_dataset=_dataset(splits.validation, tokenizer, cfg.data.max_length),
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=_accuracy,
            teacher=teacher.model,
            evaluation=_dataset(splits.eval, tokenizer, cfg.data.max_length),
        )
        nested = os.environ.get("MLFLOW_NESTED_RUN")
        os.environ["MLFLOW_NESTED_RUN"] = "true"  # each trial's run under the recipe's run
        try:
            with tracking.job_run(f"{cfg.name}-trainer-recipe", registry.Role.TRAINER_RECIPE) as run:
                trainer.hyperparameter_search(
                    hp_space=hp_space,
                    compute_objective=lambda metrics: metrics["eval_accuracy"],
                    n_trials=cfg.search.n_trials,
                    direction="maximize",
                    backend="optuna",
                    sampler=TrialDraws(cfg.search.seed, cfg.search.seed),  # the sweep's draws, trial for trial
                    pruner=make_pruner(cfg),
                )
                result = RecipeResult(run.info.run_id, sampled, dict(trainer.finished))
                if result.best_trial is not None:
                    best_val, best_eval = result.finished[result.best_trial]
                    tracking.log_metrics({f"best_{registry.METRIC}": best_val, f"best_{registry.EVAL_METRIC}": best_eval})
                    # where the project's trials keep theirs, so the two bests can be compared sentence by sentence later
                    tracking.log_array(EVAL_LOGITS, trainer.eval_logits[result.best_trial])
        finally:
            if nested is None:
                os.environ.pop("MLFLOW_NESTED_RUN")
            else:
                os.environ["MLFLOW_NESTED_RUN"] = nested
    return result
