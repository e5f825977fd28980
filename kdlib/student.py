"""Distil one student from the cached teacher logits, inside a run its caller opened.

``prepare`` does the work every trial shares (data, the teacher's cached logits, the teacher's
weights when the student is cut from them, tokenization) once; ``train_student`` builds a fresh
student and trains it with the KD loss; ``log_student_run`` does that in the caller's MLflow run
(the distill job's, or a sweep trial's). The teacher never runs during student training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from kdlib import batching, logits_cache, precision, registry, tracking
from kdlib.config import ExperimentConfig, ModelConfig
from kdlib.data import Splits, load_splits
from kdlib.errors import KDError
from kdlib.losses import kd_loss
from kdlib.metrics import agreement, classification_metrics
from kdlib.models import Classifier, count_parameters, cut_from_teacher, load_classifier
from kdlib.training import EpochCallback, FitResult, fit


@dataclass
class StudentData:
    splits: Splits
    teacher_version: str
    teacher_run_id: str
    teacher_train_logits: np.ndarray  # [n_train, labels], eval-mode teacher
    teacher_dev_logits: np.ndarray  # [n_dev, labels]
    template: Classifier  # the untrained student every trial starts from (copied, never trained)
    train: batching.Encoded
    dev: batching.Encoded


def prepare(cfg: ExperimentConfig, workdir: str) -> StudentData:
    """Load data, the champion teacher's logits and the initial student; refuse mismatched logits."""
    chosen = precision.resolve(cfg.distill.train.mixed_precision)
    print(f"students: training in {chosen.mixed_precision} ({chosen.reason})", flush=True)
    splits = load_splits(cfg.data)
    name = registry.teacher_model_name(cfg)
    hint = f"run the teacher entry point first: mlflow run . -e teacher --env-manager local -P experiment=<this experiment file> (experiment name {cfg.name!r})"
    version = registry.champion_version(name, hint)
    artifact = tracking.run_tag(version.run_id, logits_cache.TAG)
    if not artifact:
        raise KDError(f"teacher {name} version {version.version} (run {version.run_id}) has no cached logits; rerun the teacher entry point")
    folder = tracking.download_run_artifact(version.run_id, artifact, workdir)
    expected = {
        "teacher_model": name,
        "teacher_version": str(version.version),
        "train_fingerprint": splits.train.fingerprint,
        "dev_fingerprint": splits.eval.fingerprint,
    }
    train_logits, dev_logits = logits_cache.read(folder, expected)
    if cfg.student.teacher_layers:
        hf_dir = registry.fetch_model(f"models:/{name}/{version.version}", workdir).folder
        teacher = load_classifier(
            "teacher", ModelConfig(name_or_path=str(hf_dir)), cfg.data.label_names, [], cfg.data.max_length, cfg.distill.train.seed
        )
        template = cut_from_teacher(teacher, cfg.student.teacher_layers)
    else:
        template = load_classifier("student", cfg.student, cfg.data.label_names, splits.train.texts, cfg.data.max_length, cfg.distill.train.seed)
    train = batching.encode(splits.train, template.tokenizer, cfg.data.max_length, cfg.cache_dir)
    dev = batching.encode(splits.eval, template.tokenizer, cfg.data.max_length, cfg.cache_dir)
    return StudentData(splits, str(version.version), version.run_id, train_logits, dev_logits, template, train, dev)


def student_metrics(logits: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray) -> dict[str, float]:
    """Accuracy and loss on the labels, and agreement: the share of examples where student and teacher predict the same label."""
    return {**classification_metrics(logits, labels), "agreement": agreement(logits, teacher_logits)}


def train_student(
    cfg: ExperimentConfig, data: StudentData, on_epoch_end: EpochCallback | None = None, label: str = "student: "
) -> tuple[Classifier, FitResult]:
    """A fresh copy of the initial student, trained with the KD loss at ``cfg.distill``'s settings."""
    distill, train_cfg = cfg.distill, cfg.distill.train
    teacher_logits = torch.from_numpy(data.teacher_train_logits)

    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]):
        # Soft targets for exactly this batch's examples: [batch, labels], gathered by example index.
        targets = teacher_logits[batch["index"].cpu()].to(logits.device)
        loss, kl, ce = kd_loss(logits, targets, batch["labels"], distill.temperature, distill.alpha)
        return loss, {"kd_loss": kl, "ce_loss": ce}

    student = Classifier(data.template.tokenizer, copy.deepcopy(data.template.model))
    pad = student.tokenizer.pad_token_id
    result = fit(
        student.model,
        batching.train_loader(data.train, pad, train_cfg.batch_size, train_cfg.seed),
        batching.eval_loader(data.dev, pad, train_cfg.eval_batch_size),
        lambda logits: student_metrics(logits, data.dev.labels, data.teacher_dev_logits),
        train_cfg,
        loss_fn=loss_fn,
        on_epoch_end=on_epoch_end,
        label=label,
    )
    student.model = result.model
    return student, result


@dataclass(frozen=True)
class StudentResult:
    run_id: str
    dev_accuracy: float
    model_uri: str


def log_student_run(cfg: ExperimentConfig, data: StudentData, on_epoch_end: EpochCallback | None = None, label: str = "student: ") -> StudentResult:
    """Inside an open MLflow run: log the student's settings, train it, log per-epoch metrics and the model.

    ``on_epoch_end`` runs after each epoch's metrics are logged (a sweep trial reports and prunes there).
    """
    tracking.log_config(
        cfg,
        ("data", "student", "distill"),  # the teacher's settings are its own run's
        {
            "teacher_version": data.teacher_version,
            "teacher_run_id": data.teacher_run_id,
            "n_train": len(data.train),
            "n_dev": len(data.dev),
            "parameters": count_parameters(data.template.model),
            "non_embedding_parameters": count_parameters(data.template.model, embeddings=False),
            "train_tokens": int(data.train.lengths.sum()),
            "distill.train.precision": precision.resolve(cfg.distill.train.mixed_precision).mixed_precision,
        },
    )
    tracking.log_splits(cfg.data.source, data.splits)
    with tracking.pending_model() as model_id:

        def logged(epoch: int, metrics: dict[str, float]) -> None:
            tracking.log_epoch(epoch, metrics, model_id)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)

        student, result = train_student(cfg, data, logged, label)
        model_uri = tracking.log_classifier(student, cfg.data.max_length, model_id=model_id)
    return StudentResult(tracking.active_run_id(), result.history[-1][registry.METRIC], model_uri)
