"""Sweep workers as separate processes: a worker killed mid-trial, and two workers sharing PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from kdlib.teacher import run_teacher
from kdlib.tracking import ROLE_TAG
from search.study import make_storage
from tests.conftest import SMOKE, all_runs, subprocess_env, wait_for
from tests.test_sweep import config

WORKER = [sys.executable, "-m", "kdlib", "sweep", "--experiment", str(SMOKE), "data.max_eval_examples=200", "report.latency_calls=0"]


@pytest.fixture
def teacher(tmp_path):
    run_teacher(config())


def test_worker_killed_mid_trial_then_same_command_again(teacher, tmp_path):
    journal = tmp_path / "mlflow.optuna-journal.log"  # named after the store, sqlite:///<tmp_path>/mlflow.db
    command = [*WORKER, "n_trials=3", "search.space.distill.train.epochs.low=3", "pruner=none"]
    worker = subprocess.Popen(command, env=subprocess_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def trial_running_with_run():
        try:
            study = optuna.load_study(study_name="smoke-sweep", storage=make_storage(str(journal))[0])
        except KeyError:  # the worker has not created the study yet
            return None
        running = study.get_trials(states=(TrialState.RUNNING,))
        return running[0] if running and "mlflow_run_id" in running[0].user_attrs else None

    killed = wait_for(trial_running_with_run, 300, "a trial to start in the worker")
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=60)
    assert MlflowClient().get_run(killed.user_attrs["mlflow_run_id"]).info.status == "RUNNING"  # left behind by the kill

    done = subprocess.run(command, env=subprocess_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="smoke-sweep", storage=make_storage(str(journal))[0])
    trials = study.get_trials()
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert [t.number for t in by_state[TrialState.FAIL]] == [killed.number]
    assert len(by_state[TrialState.COMPLETE]) == 3
    retried = [t for t in by_state[TrialState.COMPLETE] if RetryFailedTrialCallback.retried_trial_number(t) == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert MlflowClient().get_run(killed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in all_runs())
    # Every finished trial ran once: one MLflow run per trial number.
    numbers = [r.data.tags["optuna.trial"] for r in all_runs() if r.data.tags.get("kd.role") == "student-trial"]
    assert sorted(numbers) == sorted({*numbers})


def test_a_stopped_sweep_stops_its_local_workers(teacher, tmp_path):
    """SIGTERM to the sweep command (kill, a scheduler): its second local process stops too, nothing is
    left RUNNING, and the command says how to resume, as after Ctrl-C."""
    journal = tmp_path / "mlflow.optuna-journal.log"
    command = [*WORKER, "n_trials=20", "search.workers=2", "pruner=none", "search.space.distill.train.epochs.low=3"]
    log = tmp_path / "stderr.log"  # a file, not a pipe: a worker outliving the launcher would hold a pipe open
    with log.open("w") as stderr:
        launcher = subprocess.Popen(command, env=subprocess_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)

    def a_trial_with_a_run_in_each_process():
        try:
            study = optuna.load_study(study_name="smoke-sweep", storage=make_storage(str(journal))[0])
        except KeyError:
            return None
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs]
        pids = {int(t.user_attrs["worker"].rpartition(":")[2]) for t in running}  # the attribute reads host:pid
        return pids if len(pids) == 2 else None

    (other,) = wait_for(a_trial_with_a_run_in_each_process, 300, "a trial running in each of the two processes") - {launcher.pid}
    launcher.send_signal(signal.SIGTERM)
    try:
        launcher.wait(timeout=300)
        assert launcher.returncode == 130, log.read_text()[-3000:]
        assert "rerun the same command to resume" in log.read_text()
        with pytest.raises(ProcessLookupError):  # stopped, and reaped by the launcher before it exited
            os.kill(other, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(other, signal.SIGKILL)  # when the test fails: no worker left training
    study = optuna.load_study(study_name="smoke-sweep", storage=make_storage(str(journal))[0])
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 2  # the two stopped mid-trial, retried on resume
    running = [(r.data.tags.get(ROLE_TAG), r.info.run_name) for r in all_runs("attributes.status = 'RUNNING'")]
    assert not running, (running, log.read_text()[-3000:])  # which runs, and what the command printed


def test_two_workers_share_one_study_in_postgresql(teacher, tmp_path, postgres_url):
    n_trials = 4
    command = [*WORKER, f"n_trials={n_trials}", f"storage={postgres_url}", "search.space.distill.train.epochs.high=2"]
    env = subprocess_env(tmp_path)
    workers = [
        subprocess.Popen([*command, f"seed={seed}"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for seed in (0, 1)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="smoke-sweep", storage=postgres_url)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    assert all(t.state != TrialState.RUNNING for t in trials)
    workers_used = {t.user_attrs["worker"] for t in finished}
    assert len(workers_used) == 2, "both workers ran trials"
    runs = [r for r in all_runs() if r.data.tags.get("kd.role") == "student-trial"]
    numbers = [r.data.tags["optuna.trial"] for r in runs]
    assert len(numbers) == len(set(numbers)), "no trial ran twice"
    assert all(r.info.status in ("FINISHED", "FAILED") for r in all_runs())
    # One tree: the second worker's sweep run nests under the first's.
    sweeps = [r for r in all_runs() if r.data.tags.get("kd.role") == "sweep"]
    roots = [r for r in sweeps if "mlflow.parentRunId" not in r.data.tags]
    assert len(sweeps) == 2 and len(roots) == 1


def test_a_worker_that_loses_the_race_to_create_optunas_tables_opens_the_storage(postgres_url):
    """Two workers starting together on an empty database: the other one commits Optuna's tables
    after this one found none and before it creates them (the moment is pinned by SQLAlchemy's
    before_create event), so this one's CREATE fails as "already exists"."""
    from optuna.storages._rdb import models

    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as other_worker:
        transaction = other_worker.begin()
        models.BaseModel.metadata.create_all(other_worker)
        sqlalchemy.event.listen(models.BaseModel.metadata, "before_create", lambda *_, **__: transaction.commit(), once=True, insert=True)
        storage, _ = make_storage(postgres_url)
    engine.dispose()
    study = optuna.create_study(study_name="raced", storage=storage)
    assert optuna.load_study(study_name="raced", storage=postgres_url).study_name == study.study_name
