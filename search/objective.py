"""One trial: sample settings, train a student in a nested MLflow run, report every epoch, prune."""

from __future__ import annotations

import os
import socket

import mlflow
import optuna
from optuna.trial import TrialState

from kdlib import tracking
from kdlib.config import ExperimentConfig, replace
from kdlib.distill import METRIC, log_student_run
from kdlib.student import StudentData
from search.space import suggest

# Trials that hold (or will hold) one of the n_trials places.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class SurplusTrial(Exception):
    """Another worker already took the last of the n_trials places."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Objective:
    def __init__(self, cfg: ExperimentConfig, data: StudentData, study_name: str):
        self.cfg = cfg
        self.data = data
        self.study_name = study_name
        self.surplus = False  # set when this worker found the study full; its loop then stops

    def _check_place(self, trial: optuna.Trial) -> None:
        # Trial numbers are handed out atomically by the storage, so ranking by number gives
        # concurrent workers one consistent answer to "is there still room for this trial?".
        earlier = trial.study.get_trials(deepcopy=False, states=COUNTED)
        if sum(t.number < trial.number for t in earlier) >= self.cfg.search.n_trials:
            self.surplus = True
            raise SurplusTrial(f"trial {trial.number} is beyond n_trials={self.cfg.search.n_trials}")

    def __call__(self, trial: optuna.Trial) -> float:
        self._check_place(trial)
        trial_cfg = replace(self.cfg, suggest(trial, self.cfg))
        tags = {"kd.role": "student-trial", "optuna.study": self.study_name, "optuna.trial": str(trial.number)}
        # Recorded so a later worker can close both runs if this process dies mid-trial.
        trial.set_user_attr("worker_run_id", mlflow.active_run().info.run_id)
        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, tags=tags)
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        trial.set_user_attr("worker", worker_id())
        status = "FAILED"

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            tracking.log_epoch(epoch, metrics)
            trial.report(metrics[METRIC], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{METRIC} {metrics[METRIC]:.4f} after epoch {epoch} is below the pruner's bar")

        try:
            result = log_student_run(trial_cfg, self.data, on_epoch_end)
            trial.set_user_attr("model_uri", result.model_uri)
            status = "FINISHED"
            return result.dev_accuracy
        except optuna.TrialPruned:
            # A pruned trial ended as planned: FINISHED, and tagged so it can be told apart.
            mlflow.set_tag("optuna.pruned", "true")
            status = "FINISHED"
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            # Explicit, not a `with` block: ending the child must never end the sweep's parent run.
            mlflow.end_run(status)
