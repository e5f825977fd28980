"""The distill job: one student, trained against the champion teacher's cached logits, tracked."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from kdlib import tracking
from kdlib.config import ExperimentConfig
from kdlib.student import StudentData, prepare, train_student

METRIC = "dev_accuracy"


@dataclass(frozen=True)
class StudentResult:
    run_id: str
    dev_accuracy: float
    model_uri: str


def student_model_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-student"


def log_student_run(cfg: ExperimentConfig, data: StudentData, on_epoch_end=tracking.log_epoch) -> StudentResult:
    """Inside an open MLflow run: log the student's settings, train it, log per-epoch metrics and the model."""
    tracking.log_config(
        cfg,
        {
            "teacher_version": data.teacher_version,
            "teacher_run_id": data.teacher_run_id,
            "n_train": len(data.train),
            "n_dev": len(data.dev),
            "parameters": sum(p.numel() for p in data.template.model.parameters()),
        },
    )
    student, result = train_student(cfg, data, on_epoch_end)
    model_uri = tracking.log_classifier(student, cfg.data.max_length)
    return StudentResult(tracking.active_run_id(), result.history[-1][METRIC], model_uri)


def run_distill(cfg: ExperimentConfig) -> tuple[StudentResult, str, bool]:
    """Train, log, register as <name>-student; ``champion`` moves only if the student beats it."""
    with tempfile.TemporaryDirectory(prefix="kd-distill-") as tmp:
        data = prepare(cfg, tmp)
        with tracking.job_run(cfg.name, "distill", {"kd.role": "student"}):
            result = log_student_run(cfg, data)
            with tracking.registered_version(result.model_uri, student_model_name(cfg)) as version:
                promoted = tracking.promote_if_better(student_model_name(cfg), version, METRIC, result.dev_accuracy)
    return result, version, promoted
