"""The Optuna study: its name, its storage, and the trials whose worker died.

The study outlives every process: the sweep resumes it and the report reads it. Several workers
may share one storage (PostgreSQL across machines). A worker that dies mid-trial leaves its trial
RUNNING: RDB storages fail it by heartbeat, the default journal file by checking the recorded
process on this host; either way the trial's MLflow run is marked FAILED and the trial is retried once.
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState

from kdlib import registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.errors import KDError

# Tags on the MLflow runs of a study (its workers' sweep runs, its trials, its plain student): the study, the trial.
STUDY_TAG, TRIAL_TAG = "optuna.study", "optuna.trial"
ROOT_ATTR = "mlflow_sweep_run_id"  # study attribute: the sweep's first MLflow run, root of its tree
STORE_ATTR = "mlflow_tracking_uri"  # study attribute: the MLflow store its runs and models live in
DRAW_SEED_ATTR = "draw_seed"  # study attribute: the seed of its first trials' random draws (its creator's search.seed)
STARTUP_TRIALS = 10  # trials drawn at random before TPE models anything (TPESampler's own default)
JOURNAL = "optuna-journal"
HEARTBEAT_S = 10
POLL_S = 1.0  # how often a worker with no place left looks at the study again while other workers' trials run
# Trial attributes: the trial's own MLflow run, its worker's run, and the worker process.
RUN_ATTR, WORKER_RUN_ATTR, WORKER_ATTR = "mlflow_run_id", "worker_run_id", "worker"
MODEL_ATTR = "model_uri"  # trial attribute: the trained student's model URI
EVAL_ATTR = "eval_accuracy"  # trial attribute: its evaluation-split accuracy (never the objective)
# Trials that hold (or will hold) one of the n_trials places.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def study_name(cfg: ExperimentConfig) -> str:
    return cfg.search.study_name or f"{cfg.name}-sweep"


def trial_runs(experiment: str, study_name: str) -> list:
    """The MLflow runs of the study's trials, whichever worker ran them: each worker's trials nest
    under its own sweep run, so the children of one sweep run are one worker's share."""
    return tracking.find_runs(experiment, f"tags.`{tracking.ROLE_TAG}` = '{registry.Role.TRIAL}' and tags.`{STUDY_TAG}` = '{study_name}'")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def default_storage() -> str:
    """A journal file named after the MLflow store, so two stores in one folder never share a study:
    ``<db>.optuna-journal.log`` beside a local SQLite store, else ``optuna-journal-<hash of the URI>.log``
    in the working directory."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return str(db.parent / f"{db.stem}.{JOURNAL}.log")
    return str(Path.cwd() / f"{JOURNAL}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}.log")


def safe_url(url: str) -> str:
    """A storage URL fit to log or print: a database password is masked (``***``)."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL SQLAlchemy reads: keep the scheme and host part only
        return url.split("@")[-1]


def check_store(study: optuna.Study) -> None:
    """Tie the study to this MLflow store; refuse it if its runs and models live in another, or if
    its trials were chosen on the evaluation split by an earlier version."""
    here = tracking.tracking_uri()
    recorded = study.user_attrs.get(STORE_ATTR)
    if recorded is None:
        study.set_user_attr(STORE_ATTR, here)
    elif recorded != here:
        raise KDError(
            f"search.storage: study {study.study_name!r} belongs to the MLflow store {recorded}, not {here}; "
            "point MLFLOW_TRACKING_URI at that store, or give this store its own study (search.study_name or search.storage)"
        )
    unscored = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if EVAL_ATTR not in t.user_attrs]
    if unscored:
        raise KDError(
            f"search.study_name: study {study.study_name!r} holds trials chosen on the evaluation split (trials {unscored[:5]}, "
            "made before validation and evaluation were separate); expected a study of this version: give the sweep a new search.study_name"
        )


def _mark_run_failed(trial: FrozenTrial) -> None:
    for key in (RUN_ATTR, WORKER_RUN_ATTR):
        run_id = trial.user_attrs.get(key)
        if run_id:
            tracking.fail_if_running(run_id, "worker stopped mid-trial")


def _retry(study: optuna.Study, trial: FrozenTrial) -> None:
    _mark_run_failed(trial)
    # The retry is a new attempt with the same settings. Optuna would copy the failed trial's user
    # attributes into it: its dead worker's id, its runs and model. A worker that took the retry would
    # then look dead to every other worker until it recorded itself, and be failed mid-start.
    attempt = copy.copy(trial)
    attempt.user_attrs = {}
    RetryFailedTrialCallback(max_retry=1)(study, attempt)


def make_pruner(cfg: ExperimentConfig) -> optuna.pruners.BasePruner:
    """The pruner ``search.pruner`` names (the sweep's, and the Trainer recipe's beside it)."""
    if cfg.search.pruner == "median":
        # Wait for two finished trials and judge from epoch 1 on: epochs are few and expensive.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if cfg.search.pruner == "hyperband":
        # The resource is epochs: at most the top of the searched epoch range.
        epochs = cfg.search.space.get("distill.train.epochs")
        most = int(epochs.high) if epochs and not epochs.choices else cfg.distill.train.epochs
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=most)
    return optuna.pruners.NopPruner()


class TrialDraws(optuna.samplers.BaseSampler):
    """TPE whose first ``STARTUP_TRIALS`` trials are random draws keyed by the trial's number.

    TPE draws its random first trials from one generator in the order they are asked for, so with two
    processes sharing a study which settings get tried depends on which process asks first, and each
    local worker (its own seed) draws settings a one-process sweep never tries. Here trial ``n``'s
    random settings come from ``draw_seed`` and ``n`` alone: one command tries the same settings with
    one worker or several, and the Trainer recipe beside it (``search/benchmarks/trainer_recipe.py``)
    tries them too. After those trials TPE (``seed``) samples as usual.
    """

    def __init__(self, draw_seed: int, seed: int):
        self.draw_seed = draw_seed
        self._tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS)

    def _drawn(self, trial: FrozenTrial) -> bool:
        return trial.number < STARTUP_TRIALS

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return {} if self._drawn(trial) else self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return {} if self._drawn(trial) else self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution) -> object:
        if not self._drawn(trial):
            return self._tpe.sample_independent(study, trial, param_name, param_distribution)
        key = np.random.SeedSequence([self.draw_seed, trial.number, zlib.crc32(param_name.encode())]).generate_state(1)[0]
        return optuna.samplers.RandomSampler(seed=int(key)).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values) -> None:
        self._tpe.after_trial(study, trial, state, values)


def open_study(cfg: ExperimentConfig, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, bool]:
    """The sweep's study, and whether this call created it: of workers starting together on a new
    study, exactly one did (the storage refuses a second study of one name). Its sampler is
    ``TrialDraws`` with the creator's ``search.seed`` for the first trials' draws, whichever worker asks,
    and this worker's seed, moved on by the trials already there (a resumed or second worker must not
    replay another's), for TPE."""
    name, pruner = study_name(cfg), make_pruner(cfg)
    try:
        study, created = optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=pruner), True
        study.set_user_attr(DRAW_SEED_ATTR, cfg.search.seed)
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.load_study(study_name=name, storage=storage, pruner=pruner), False
    study.sampler = TrialDraws(study.user_attrs.get(DRAW_SEED_ATTR, cfg.search.seed), cfg.search.seed + len(study.trials))
    return study, created


def make_storage(url: str | None) -> tuple[optuna.storages.BaseStorage, str]:
    """The storage and its URL as it may be shown or logged (password masked)."""
    url = url or default_storage()
    if "://" in url:
        return _open_database(url), safe_url(url)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url)), url


def _open_database(url: str) -> optuna.storages.RDBStorage:
    from sqlalchemy.exc import IntegrityError

    # Workers starting together on an empty database race to create Optuna's tables, then its version
    # rows: the loser gets a duplicate-key or "already exists" error once the winner commits, and finds
    # the rows made on its next attempt. Each of the three creation steps may be lost once.
    races_lost = 0
    while True:
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S, heartbeat_stale_trial_callback=_retry
            )
        except Exception as exc:  # SQLAlchemy raises many types for "cannot connect"
            lost_race = isinstance(exc, IntegrityError) or "already exists" in str(exc)
            if lost_race and races_lost < 3:
                races_lost += 1
                continue
            raise KDError(
                f"search.storage: cannot open {safe_url(url)!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "expected a reachable database URL or a journal file path"
            ) from None


def load_study(cfg: ExperimentConfig) -> tuple[optuna.Study, str]:
    """The experiment's existing study and its storage URL; a KDError naming what is there if it is missing."""
    name = study_name(cfg)
    url = cfg.search.storage or default_storage()
    if "://" not in url and not Path(url).is_file():
        raise KDError(f"report: no sweep has run here: the study storage {url!r} does not exist; run `mlflow run . -e sweep` first")
    storage, url = make_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage), url
    except KeyError:
        there = ", ".join(optuna.get_all_study_names(storage)) or "none"
        raise KDError(
            f"report: no study {name!r} in {safe_url(url)} (studies there: {there}); pass the experiment file the sweep ran with "
            "(-P experiment=...) or set search.study_name"
        ) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(worker: str) -> bool:
    """Whether ``host:pid`` names a process of this host that no longer runs."""
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def register_worker(study: optuna.Study, run_id: str) -> None:
    """Record this worker's MLflow run, so a worker on the same host can close it if this process dies."""
    study.set_user_attr(f"{WORKER_ATTR}:{worker_id()}", run_id)


def recover_dead_local_trials(study: optuna.Study) -> list[int]:
    """Fail and retry RUNNING trials whose process on this host is gone, and close dead workers' runs.

    Called before every trial: a journal has no heartbeat, and on one host a dead process is seen at
    once, where an RDB heartbeat would wait for its grace period (other hosts still rely on it).
    """
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead_here(str(trial.user_attrs.get(WORKER_ATTR, ""))):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            _retry(study, study._storage.get_trial(trial._trial_id))
            recovered.append(trial.number)
    for key, run_id in study.user_attrs.items():
        if key.startswith(f"{WORKER_ATTR}:") and _dead_here(key.partition(":")[2]):
            tracking.fail_if_running(run_id, "worker stopped")  # a worker killed between trials
    return recovered


def has_room(study: optuna.Study, n_trials: int) -> bool:
    """Whether a trial started now could hold one of the n_trials places: a retry waits, or fewer are counted."""
    counted = study.get_trials(deepcopy=False, states=COUNTED)
    return len(counted) < n_trials or any(t.state == TrialState.WAITING for t in counted)


def wait_for_others(study: optuna.Study) -> None:
    """One look while other workers' trials run: fail (and retry) those whose RDB heartbeat stopped, then pause."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    time.sleep(POLL_S)


def finished(study: optuna.Study) -> int:
    """Trials that hold one of the n_trials places for good: finished or pruned."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
