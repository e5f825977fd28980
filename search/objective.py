"""One trial: sample settings, train a student in a nested MLflow run, report every epoch, prune."""

from __future__ import annotations

import optuna

from kdlib import registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.configure import replace
from kdlib.student import StudentData, log_student_run
from search.space import suggest
from search.study import COUNTED, EVAL_ATTR, MODEL_ATTR, RUN_ATTR, STUDY_TAG, TRIAL_TAG, WORKER_ATTR, WORKER_RUN_ATTR, worker_id

# Short names of searched settings in run names and log lines: trial-3 T=5.2 a=0.72 lr=4.4e-05 ep=2.
SHORT = {
    "distill.temperature": "T",
    "distill.alpha": "a",
    "distill.train.learning_rate": "lr",
    "distill.train.epochs": "ep",
    "distill.transfer.copies": "copies",
}


class SurplusTrial(Exception):
    """Another worker already took the last of the n_trials places."""


class Objective:
    def __init__(self, cfg: ExperimentConfig, data: StudentData, study_name: str):
        self.cfg = cfg
        self.data = data
        self.study_name = study_name
        self.places: dict[int, int] = {}  # Optuna trial number -> its place among the n_trials (1-based)

    def _check_place(self, trial: optuna.Trial) -> int:
        """This trial's place among the n_trials (1-based); SurplusTrial if there is none left."""
        # Trial numbers are handed out atomically by the storage, so ranking by number gives
        # concurrent workers one consistent answer to "is there still room for this trial?".
        earlier = trial.study.get_trials(deepcopy=False, states=COUNTED)
        place = sum(t.number < trial.number for t in earlier) + 1
        if place > self.cfg.search.n_trials:
            raise SurplusTrial(f"trial {trial.number} is beyond n_trials={self.cfg.search.n_trials}")
        return place

    def __call__(self, trial: optuna.Trial) -> float:
        place = self.places[trial.number] = self._check_place(trial)
        params = suggest(trial, self.cfg)
        trial_cfg = replace(self.cfg, params)
        settings = " ".join(
            f"{SHORT.get(key, key.rpartition('.')[2])}={f'{value:.2g}' if isinstance(value, float) else value}" for key, value in params.items()
        )
        print(f"trial {place}/{self.cfg.search.n_trials} (Optuna trial {trial.number}) started: {settings}", flush=True)
        tags = {STUDY_TAG: self.study_name, TRIAL_TAG: str(trial.number)}
        # Recorded so a later worker can close both runs if this process dies mid-trial.
        trial.set_user_attr(WORKER_RUN_ATTR, tracking.active_run_id())
        trial.set_user_attr(WORKER_ATTR, worker_id())

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:  # after the epoch's metrics are logged
            trial.report(metrics[registry.METRIC], epoch)
            # After the last epoch there is nothing left to save: pruning would only throw the trained student away.
            if epoch < trial_cfg.distill.train.epochs and trial.should_prune():
                tracking.set_tags({"optuna.pruned": "true"})  # it ends FINISHED; the tag tells it apart
                raise optuna.TrialPruned(f"{registry.METRIC} {metrics[registry.METRIC]:.4f} after epoch {epoch} is below the pruner's bar")

        with tracking.child_run(f"trial-{trial.number} {settings}", registry.Role.TRIAL, tags, finished_on=(optuna.TrialPruned,)) as run:
            trial.set_user_attr(RUN_ATTR, run.info.run_id)
            result = log_student_run(trial_cfg, self.data, on_epoch_end, label=f"trial {place}/{self.cfg.search.n_trials}: ")
            trial.set_user_attr(MODEL_ATTR, result.model_uri)
            trial.set_user_attr(EVAL_ATTR, result.eval_accuracy)
            return result.val_accuracy
