"""The distill job: one student, trained against the champion teacher's cached logits, tracked."""

from __future__ import annotations

import tempfile

from kdlib import registry, tracking
from kdlib.config import ExperimentConfig
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
            version, promoted = registry.register_and_promote(result.model_uri, registry.student_model_name(cfg), result.dev_accuracy)
    return result, version, promoted
