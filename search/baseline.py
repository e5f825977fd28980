"""The plain student a sweep ends with, and the distillation gain: does distilling pay on sentences
that no choice looked at?

The plain student is the best trial with distillation taken out (alpha 0, no transfer set, every
other setting the same), trained on the same data and scored on the same evaluation split. The
gain is the best trial's evaluation accuracy minus the plain student's, with a 95% paired-bootstrap
interval and an exact McNemar test over the evaluation sentences (``kdlib.metrics.paired_gain``).
"""

from __future__ import annotations

from dataclasses import dataclass

from optuna.trial import FrozenTrial

from kdlib import registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.configure import replace
from kdlib.metrics import PairedGain, paired_gain
from kdlib.student import EVAL_LOGITS, StudentData, log_student_run
from search.study import RUN_ATTR, STUDY_TAG

GAIN = "distillation_gain"
BASELINE_TAG = "kd.baseline_of_trial"  # on the plain student's run: the trial it is the plain twin of
# Distillation taken out of a trial's settings.
PLAIN = {"distill.alpha": 0.0, "distill.transfer.copies": 0, "distill.transfer.unlabelled_split": None, "distill.transfer.unlabelled_max": None}


@dataclass(frozen=True)
class Baseline:
    run_id: str
    val_accuracy: float
    eval_accuracy: float
    gain: PairedGain  # best trial minus plain student, on the evaluation split


def _existing(cfg: ExperimentConfig, study_name: str, trial: int) -> str | None:
    """A finished plain twin of this trial (a resumed sweep whose best trial did not change)."""
    runs = tracking.find_runs(
        cfg.name,
        f"tags.`{tracking.ROLE_TAG}` = '{registry.Role.PLAIN_STUDENT}' and tags.`{STUDY_TAG}` = '{study_name}' "
        f"and tags.`{BASELINE_TAG}` = '{trial}' and attributes.status = 'FINISHED'",
    )
    return runs[0].info.run_id if runs else None


def measure(cfg: ExperimentConfig, data: StudentData, study_name: str, best: FrozenTrial) -> Baseline:
    """Train (or find) the best trial's plain twin in a run under the active sweep run; log the gain on the sweep run."""
    run_id = _existing(cfg, study_name, best.number)
    if run_id is None:
        tags = {STUDY_TAG: study_name, BASELINE_TAG: str(best.number)}
        with tracking.child_run(f"plain-student of trial-{best.number}", registry.Role.PLAIN_STUDENT, tags):
            run_id = log_student_run(replace(cfg, {**best.params, **PLAIN}), data, label="plain student: ").run_id
    metrics = tracking.get_run(run_id).data.metrics
    gain = paired_gain(
        tracking.load_array(best.user_attrs[RUN_ATTR], EVAL_LOGITS),
        tracking.load_array(run_id, EVAL_LOGITS),
        data.encoded["eval"].labels,
        seed=cfg.search.seed,
    )
    tracking.log_metrics(
        {
            f"plain_{registry.METRIC}": metrics[registry.METRIC],
            f"plain_{registry.EVAL_METRIC}": metrics[registry.EVAL_METRIC],
            GAIN: gain.difference,
            f"{GAIN}_low": gain.low,
            f"{GAIN}_high": gain.high,
            f"{GAIN}_p_value": gain.p_value,
        }
    )
    tracking.set_tags({"plain_student.run_id": run_id, f"{GAIN}.trial": str(best.number)})
    return Baseline(run_id, metrics[registry.METRIC], metrics[registry.EVAL_METRIC], gain)


def describe(best_eval: float, baseline: Baseline) -> str:
    g = baseline.gain
    return (
        f"{GAIN} {100 * g.difference:+.2f} points on the evaluation split (95% interval {100 * g.low:+.2f} to {100 * g.high:+.2f}; "
        f"McNemar p = {g.p_value:.3f}; {g.a_only} sentences only the distilled student gets right, {g.b_only} only the plain one): "
        f"best trial {best_eval:.4f}, plain student {baseline.eval_accuracy:.4f}"
    )
