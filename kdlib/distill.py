"""The distill job: one student, trained against the champion teacher's cached logits, tracked."""

from __future__ import annotations

import tempfile

from kdlib import registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.configure import flatten
from kdlib.student import StudentResult, log_student_run, prepare


def run_distill(cfg: ExperimentConfig, register: bool = True, role: str = registry.Role.STUDENT) -> tuple[StudentResult, str | None, bool]:
    """Train and log one student; with ``register``, register it as <name>-student, and ``champion``
    moves only if it beats the current champion. Returns (result, version, promoted)."""
    with tempfile.TemporaryDirectory(prefix="kd-distill-") as tmp:
        data = prepare(cfg, tmp)
        with tracking.job_run(cfg.name, role, run_name="distill" if register else role):
            result = log_student_run(cfg, data)
            if not register:
                return result, None, False
            settings = {
                key: value
                for key, value in flatten(cfg.distill, "distill.").items()
                if not key.startswith("distill.train.") or key.endswith(("learning_rate", "epochs"))
            }
            version, promoted = registry.register_and_promote(
                result.model_uri,
                registry.student_model_name(cfg),
                result.val_accuracy,
                **registry.notes("Student of the distill job", result.val_accuracy, result.eval_accuracy, settings),
            )
    return result, version, promoted
