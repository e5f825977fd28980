"""The sweep driver: an Optuna study that outlives the process, one parent MLflow run, a champion.

Rerunning the same command resumes the study and runs only the trials still missing to reach
``search.n_trials`` (finished or pruned). Several workers may share one study through one storage
(PostgreSQL across machines); each worker's run nests under the sweep's first run, so ``mlflow ui``
shows one tree. A worker that dies mid-trial leaves its trial RUNNING: RDB storages fail it by
heartbeat, the default journal file by checking the recorded process on this host; either way the
trial's MLflow run is marked FAILED and the trial is retried once.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState

from kdlib import tracking
from kdlib.config import ExperimentConfig
from kdlib.distill import METRIC, student_model_name
from kdlib.errors import KDError
from kdlib.student import prepare
from kdlib.training import NonFiniteLoss
from search import space
from search.objective import Objective, SurplusTrial

ROOT_ATTR = "mlflow_sweep_run_id"
JOURNAL = "optuna-journal.log"
HEARTBEAT_S = 10


@dataclass(frozen=True)
class SweepResult:
    study_name: str
    storage: str
    run_id: str
    finished: int
    best_value: float | None
    best_params: dict
    version: str | None
    promoted: bool


def study_name(cfg: ExperimentConfig) -> str:
    return cfg.search.study_name or f"{cfg.name}-sweep"


def default_storage() -> str:
    """A journal file beside the MLflow store when that is a local SQLite file, else in the working directory."""
    uri = mlflow.get_tracking_uri()
    folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else Path.cwd()
    return str(folder / JOURNAL)


def _mark_run_failed(trial: FrozenTrial) -> None:
    client = MlflowClient()
    for key in ("mlflow_run_id", "worker_run_id"):
        run_id = trial.user_attrs.get(key)
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
            client.set_tag(run_id, "optuna.failure", "worker stopped mid-trial")


def _retry(study: optuna.Study, trial: FrozenTrial) -> None:
    _mark_run_failed(trial)
    RetryFailedTrialCallback(max_retry=1)(study, trial)


def make_storage(url: str | None) -> tuple[optuna.storages.BaseStorage, str]:
    url = url or default_storage()
    if "://" in url:
        from sqlalchemy.exc import IntegrityError

        for attempt in range(3):
            try:
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S, heartbeat_stale_trial_callback=_retry
                )
                return storage, url
            except IntegrityError:
                # Workers starting together race to create Optuna's tables; the loser finds them made.
                if attempt == 2:
                    raise
            except Exception as exc:  # SQLAlchemy raises many types for "cannot connect"
                raise KDError(
                    f"search.storage: cannot open {url!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); expected a reachable database URL or a journal file path"
                ) from None
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url)), url


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_local_trials(study: optuna.Study) -> list[int]:
    """Journal storages have no heartbeat: fail and retry RUNNING trials whose process on this host is gone."""
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            _retry(study, study._storage.get_trial(trial._trial_id))
            recovered.append(trial.number)
    return recovered


def _pruner(cfg: ExperimentConfig) -> optuna.pruners.BasePruner:
    if cfg.search.pruner == "median":
        # Wait for two finished trials and judge from epoch 1 on: epochs are few and expensive.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if cfg.search.pruner == "hyperband":
        # The resource is epochs: at most the top of the searched epoch range.
        epochs = cfg.search.space.get("distill.train.epochs")
        most = int(epochs.high) if epochs and not epochs.choices else cfg.distill.train.epochs
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=most)
    return optuna.pruners.NopPruner()


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _attach_to_root(study: optuna.Study, run_id: str) -> str:
    """The sweep's first run is the root of its MLflow tree; later workers and resumes nest under it."""
    root = study.user_attrs.get(ROOT_ATTR)
    if root is None:
        study.set_user_attr(ROOT_ATTR, run_id)
        root = study.user_attrs.get(ROOT_ATTR, run_id)
    if root != run_id:
        mlflow.set_tag("mlflow.parentRunId", root)
    return root


def _log_best(study: optuna.Study, trial: FrozenTrial) -> None:
    if trial.state == TrialState.COMPLETE and study.best_trial.number == trial.number:
        mlflow.log_metrics(
            {f"best_{METRIC}": trial.value, **{f"best.{k}": float(v) for k, v in trial.params.items() if isinstance(v, (int, float))}},
            step=trial.number,
        )
        mlflow.set_tags({"best.trial": str(trial.number), "best.run_id": trial.user_attrs.get("mlflow_run_id", "")})


def run_sweep(cfg: ExperimentConfig) -> SweepResult:
    space.validate(cfg)
    storage, url = make_storage(cfg.search.storage)
    name = study_name(cfg)
    with tempfile.TemporaryDirectory(prefix="kd-sweep-") as tmp:
        data = prepare(cfg, tmp)
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=_pruner(cfg), load_if_exists=True)
        # Reseed on resume: a resumed or second worker must not replay the first worker's draws.
        study.sampler = optuna.samplers.TPESampler(seed=cfg.search.seed + len(study.trials))
        recover_dead_local_trials(study)
        objective = Objective(cfg, data, name)
        with tracking.job_run(cfg.name, "sweep", {"kd.role": "sweep", "optuna.study": name, "optuna.storage": url}) as run:
            _attach_to_root(study, run.info.run_id)
            mlflow.log_params(
                {
                    "search.n_trials": cfg.search.n_trials,
                    "search.storage": url,
                    "search.study_name": name,
                    "search.pruner": cfg.search.pruner,
                    "search.seed": cfg.search.seed,
                }
            )
            deadline = time.monotonic() + cfg.search.timeout if cfg.search.timeout else None
            while finished(study) < cfg.search.n_trials and not objective.surplus and (deadline is None or time.monotonic() < deadline):
                study.optimize(objective, n_trials=1, catch=(NonFiniteLoss, SurplusTrial), callbacks=[_log_best])
            result = _promote_best(cfg, study, run.info.run_id, url)
    return result


def _promote_best(cfg: ExperimentConfig, study: optuna.Study, run_id: str, url: str) -> SweepResult:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    done = finished(study)
    if not complete:
        mlflow.set_tag("champion.promoted", "false")
        return SweepResult(study.study_name, url, run_id, done, None, {}, None, False)
    best = study.best_trial
    model_name = student_model_name(cfg)
    with tracking.registered_version(best.user_attrs["model_uri"], model_name, run_id=best.user_attrs["mlflow_run_id"]) as version:
        promoted = tracking.promote_if_better(model_name, version, METRIC, best.value)
    return SweepResult(study.study_name, url, run_id, done, best.value, best.params, version, promoted)
