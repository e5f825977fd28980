"""Scale-out against real servers, as the README sets it up: an MLflow tracking server (PostgreSQL
backend, artifacts proxied through the server) and one PostgreSQL Optuna study shared by 4 workers,
one of them SIGKILLed mid-trial at a random point; then every other job against the same server."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from search.study import RUN_ATTR, WORKER_ATTR
from tests.conftest import SMOKE, all_runs, subprocess_env, wait_for

SECRET = "kd-secret"  # PostgreSQL here trusts loopback; the password only has to stay out of MLflow
FAST = ["data.max_eval_examples=200", "train.epochs=2"]
SWEEP = [*FAST, "search.space.distill.train.epochs.high=2", "report.latency_calls=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_database(postgres_url: str, name: str) -> str:
    import psycopg2

    dsn = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


class TrackingServer:
    """``mlflow server`` on loopback with a PostgreSQL backend and proxied artifacts; restartable on its port."""

    def __init__(self, backend: str, artifacts: Path):
        self.backend, self.artifacts, self.port = backend, artifacts, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend, "--artifacts-destination", str(self.artifacts)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "2"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.healthy, 120, "the MLflow tracking server to answer")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


@pytest.fixture
def servers(postgres_url, tmp_path, monkeypatch):
    """(tracking server, Optuna storage URL with a password) with this test's MLflow client pointed at the server."""
    server = TrackingServer(create_database(postgres_url, "mlflow"), tmp_path / "artifacts")
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    optuna_url = create_database(postgres_url, "optuna").replace("postgres@", f"postgres:{SECRET}@")
    yield server, optuna_url
    server.stop()


def job(tmp_path: Path, server: TrackingServer, *args: str, **popen) -> subprocess.Popen:
    """``python -m kdlib`` on the smoke experiment in its own process, against the server."""
    env = {**subprocess_env(tmp_path), "MLFLOW_TRACKING_URI": server.uri}
    command = [sys.executable, "-m", "kdlib", args[0], "--experiment", str(SMOKE), *args[1:]]
    return subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def trials_of(optuna_url: str, study_name: str) -> list:
    """The study's trials; none while no worker has created the study yet."""
    # Polled several times a second: each poll's connections are closed here, not when the garbage
    # collector gets to them, or they pile up past PostgreSQL's max_connections while workers start.
    storage = optuna.storages.RDBStorage(optuna_url)
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials()
    except KeyError:
        return []
    finally:
        storage.engine.dispose()


def kill_mid_trial(victim: subprocess.Popen, optuna_url: str, study_name: str, rng: random.Random) -> int:
    """SIGKILL ``victim`` at a random point of a trial it runs; returns that trial's number."""
    me = f"{socket.gethostname()}:{victim.pid}"

    def its_running_trial():
        mine = [
            t
            for t in trials_of(optuna_url, study_name)
            if t.state == TrialState.RUNNING and t.user_attrs.get(WORKER_ATTR) == me and RUN_ATTR in t.user_attrs
        ]
        return mine[0] if mine else None

    while victim.poll() is None:
        trial = wait_for(its_running_trial, 300, "the chosen worker to run a trial")
        time.sleep(rng.uniform(0.0, 1.0))  # the random kill point within the trial, not a synchronisation
        still = its_running_trial()
        if still is not None and still.number == trial.number:  # else that trial ended first: take its next one
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=60)
            return trial.number
    pytest.fail("the chosen worker ended before it could be killed mid-trial")


def check_sweep(optuna_url: str, study_name: str, n_trials: int) -> optuna.Study:
    """The invariants every shared sweep must keep, however its workers ended."""
    study = optuna.load_study(study_name=study_name, storage=optuna_url)
    trials = study.get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    runs = all_runs()
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    trial_runs = [r for r in runs if r.data.tags.get("kd.role") == "student-trial" and r.data.tags.get("optuna.study") == study_name]
    numbers = [r.data.tags["optuna.trial"] for r in trial_runs]
    assert len(numbers) == len(set(numbers)), "a trial ran twice"
    client = MlflowClient()
    for t in done:  # one finished MLflow run per finished trial
        assert client.get_run(t.user_attrs[RUN_ATTR]).info.status == "FINISHED"
    for model in client.search_registered_models():  # no empty registered model
        assert client.search_model_versions(f"name = '{model.name}'"), f"{model.name} has no version"
    for run in runs:  # the database password never reaches MLflow
        assert SECRET not in repr(run.data.params) + repr(run.data.tags)
    return study


def four_workers_one_killed(tmp_path: Path, server: TrackingServer, optuna_url: str, study_name: str, seed: int, *extra: str) -> dict:
    n_trials = 8
    rng = random.Random(seed)
    command = [
        "sweep",
        *SWEEP,
        *extra,
        f"n_trials={n_trials}",
        f"storage={optuna_url}",
        f"study_name={study_name}",
        f"output_dir={tmp_path / 'report'}",
    ]
    started = time.perf_counter()
    workers = [job(tmp_path, server, *command, f"seed={seed * 10 + i}") for i in range(4)]
    victim = rng.choice(workers)
    killed = kill_mid_trial(victim, optuna_url, study_name, rng)
    for worker in workers:
        if worker is not victim:
            finish(worker)
    study = check_sweep(optuna_url, study_name, n_trials)
    assert killed in [t.number for t in study.get_trials(states=(TrialState.FAIL,))]
    return {"wall_s": time.perf_counter() - started, "killed_trial": killed}


def test_four_workers_on_a_tracking_server_one_killed_then_every_job(servers, tmp_path):
    server, optuna_url = servers
    finish(job(tmp_path, server, "teacher", *FAST))  # its logits go up through the server's artifact proxy
    four_workers_one_killed(tmp_path, server, optuna_url, "smoke-sweep", 0, "distill.transfer.copies=1")

    client = MlflowClient()
    # One transfer set, labelled and stored on the teacher's run through the server, read by every trial.
    (teacher,) = [r for r in all_runs() if r.data.tags.get("kd.role") == "teacher"]
    (stored,) = client.list_artifacts(teacher.info.run_id, "transfer_sets")
    trials = [r for r in all_runs() if r.data.tags.get("kd.role") == "student-trial" and r.info.status == "FINISHED"]
    assert {r.data.params["transfer.digest"] for r in trials} == {stored.path.rpartition("/")[2]}
    # The sweep ended with the best trial's plain twin and logged the gain on a sweep run.
    gains = [r.data.metrics["distillation_gain"] for r in all_runs() if "distillation_gain" in r.data.metrics]
    assert gains and all(-1 <= g <= 1 for g in gains)
    assert any(r.data.tags.get("kd.role") == "plain-student" and r.info.status == "FINISHED" for r in all_runs())
    (version,) = client.search_model_versions("name = 'smoke-student'")  # every worker registered it: one version
    assert client.get_model_version_by_alias("smoke-student", "champion").version == version.version
    assert version.tags["optuna.trial"] and version.description.startswith("Best trial")
    assert (tmp_path / "report" / "smoke-sweep.html").is_file()
    root = optuna.load_study(study_name="smoke-sweep", storage=optuna_url).user_attrs["mlflow_sweep_run_id"]
    assert "report/smoke-sweep.html" in [f.path for f in client.list_artifacts(root, "report")]

    # Another process loads the champion by its alias and serves raw strings.
    load = "import mlflow; print(mlflow.pyfunc.load_model('models:/smoke-student@champion').predict(['a gorgeous film'])['label'][0])"
    loaded = subprocess.run(
        [sys.executable, "-c", load], env={**subprocess_env(tmp_path), "MLFLOW_TRACKING_URI": server.uri}, capture_output=True, text=True
    )
    assert loaded.returncode == 0 and loaded.stdout.strip() in ("negative", "positive"), loaded.stderr[-2000:]

    evaluated = finish(job(tmp_path, server, "evaluate", "data.max_eval_examples=100", "evaluate.latency_calls=5", "evaluate.throughput_batches=2"))
    assert "models:/smoke-student@champion" in evaluated
    exported = finish(job(tmp_path, server, "export", "data.max_eval_examples=100"))
    int8 = next(line.split("'")[1] for line in exported.splitlines() if line.startswith("ONNX int8"))
    assert mlflow.pyfunc.load_model(int8).predict(["a tedious mess"]).shape[0] == 1


def test_the_tracking_server_restarted_mid_sweep(servers, tmp_path):
    """Workers ride out a restart of the tracking server: MLflow's client retries with backoff."""
    server, optuna_url = servers
    finish(job(tmp_path, server, "teacher", *FAST))
    command = ["sweep", *SWEEP, "n_trials=6", f"storage={optuna_url}", f"output_dir={tmp_path / 'report'}"]
    workers = [job(tmp_path, server, *command, f"seed={i}") for i in range(2)]
    wait_for(lambda: len(trials_of(optuna_url, "smoke-sweep")) >= 2, 300, "two trials to start")
    down = time.perf_counter()
    server.stop()
    server.start()  # the same port and database: what a restarted service looks like to its clients
    down = time.perf_counter() - down
    for worker in workers:
        finish(worker)
    check_sweep(optuna_url, "smoke-sweep", 6)
    print(f"tracking server down {down:.1f} s mid-sweep; 2 workers finished 6 trials")


@pytest.mark.heavy
@pytest.mark.parametrize("seed", range(1, 11))
def test_many_random_kill_points(servers, tmp_path, seed):
    """On demand (pytest -m heavy): 10 sweeps, each with a worker killed at another random point."""
    server, optuna_url = servers
    finish(job(tmp_path, server, "teacher", *FAST))
    figures = four_workers_one_killed(tmp_path, server, optuna_url, "smoke-sweep", seed)
    print(f"seed {seed}: killed trial {figures['killed_trial']}, 4 workers, 8 trials, {figures['wall_s']:.0f} s")


@pytest.mark.heavy
def test_four_workers_against_one(servers, tmp_path):
    """On demand (pytest -m heavy -s): wall time of one 8-trial smoke sweep by 1 worker and by 4, same server."""
    server, optuna_url = servers
    finish(job(tmp_path, server, "teacher", *FAST))
    wall = {}
    for n_workers in (1, 4):
        name = f"smoke-{n_workers}-workers"
        command = ["sweep", *SWEEP, "n_trials=8", f"storage={optuna_url}", f"study_name={name}", f"output_dir={tmp_path / 'report'}"]
        started = time.perf_counter()
        for worker in [job(tmp_path, server, *command, f"seed={i}") for i in range(n_workers)]:
            finish(worker)
        wall[n_workers] = time.perf_counter() - started
        check_sweep(optuna_url, name, 8)
    print(f"8 trials: 1 worker {wall[1]:.0f} s, 4 workers {wall[4]:.0f} s ({wall[1] / wall[4]:.2f}x)")
