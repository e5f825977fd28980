"""Shared fixtures: every test runs offline, with MLflow state under its own temporary folder."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before anything imports huggingface_hub, which reads these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import mlflow  # noqa: E402
import pytest  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"


@pytest.fixture(autouse=True)
def offline_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # mlflow.set_experiment exports it
    monkeypatch.chdir(tmp_path)  # mlruns/ artifacts land here
    yield
    while mlflow.active_run():
        mlflow.end_run()


def write_tsv(path: Path, rows: list[tuple[str, object]], header: str = "sentence\tlabel") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"{s}\t{label}\n" for s, label in rows), encoding="utf-8")
    return path


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT)
    # `mlflow run --env-manager local` runs `python -m kdlib` from PATH: make it this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def mlflow_run(tmp_path: Path, entry: str, *overrides: str, experiment_name: str | None = "smoke") -> subprocess.CompletedProcess:
    """``mlflow run`` of an entry point on the smoke experiment, as the README gives it
    (``experiment_name=None``: without ``--experiment-name``)."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        entry,
        "--env-manager",
        "local",
        *(["--experiment-name", experiment_name] if experiment_name else []),
        "-P",
        f"experiment={SMOKE}",
    ]
    for override in overrides:
        command += ["-P", override]
    return subprocess.run(command, env=subprocess_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)


def printed_run_id(done: subprocess.CompletedProcess) -> str:
    """The run id ``mlflow run`` printed at the end: ``=== Run (ID '<id>') succeeded ===``."""
    return re.search(r"=== Run \(ID '(\w+)'\) succeeded ===", done.stderr).group(1)


def unavailable(why: str) -> None:
    """Skip a test whose system package is missing; under CI (CI=true) fail it instead, so a CI run
    without PostgreSQL or Chromium cannot pass by skipping what it was meant to check."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}; CI must run this test")
    pytest.skip(why)


def all_runs(filter_string: str = ""):
    """Every run of every experiment in the test's MLflow store (``filter_string``: an MLflow run filter)."""
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string)


def wait_for(condition, timeout: float, what: str):
    """Poll a condition of shared state (storage, process) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def stopped_by_sigterm(command: list[str], tmp_path: Path, condition, timeout: float, what: str):
    """Start ``command`` (from ``tmp_path``, its stderr in a file), wait until ``condition`` holds, send
    SIGTERM and wait for the process to end. Returns (exit status, its stderr, the condition's value)."""
    log = tmp_path / "stderr.log"  # a file, not a pipe: nobody reads a pipe while the command trains
    with log.open("w") as stderr:
        process = subprocess.Popen(command, env=subprocess_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        seen = wait_for(condition, timeout, what)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        process.kill()  # when the test fails: nothing left training
    return process.returncode, log.read_text(), seen


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL on loopback, from Debian's packages (.ci/run installs them)."""
    bindir = _postgres_bin()
    if bindir is None:
        unavailable("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    # Not under tmp_path: pytest's temporary root is private to root, and the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="kd-pg-"))
    # initdb and postgres refuse to run as root: run them as the postgres user Debian's package creates.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            *as_user,
            str(bindir / "postgres"),
            "-D",
            str(folder / "data"),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={folder}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ready = ["pg_isready", "-h", "127.0.0.1", "-p", str(port)]
    wait_for(lambda: subprocess.run(ready, capture_output=True).returncode == 0, 60, "PostgreSQL to accept connections")
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    server.terminate()
    server.wait(timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def in_store(folder: Path):
    """MLflow at ``folder``'s SQLite store, working in ``folder``, for fixtures wider than one test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        mp.chdir(folder)
        yield


SWEPT = ["data.max_eval_examples=200", "train.epochs=2", "search.n_trials=4", "distill.train.epochs=2", "distill.transfer.copies=1"]


@pytest.fixture(scope="session")
def swept_store(tmp_path_factory):
    """A smoke teacher and a 4-trial sweep with a transfer set (which ends with its plain student), once per session.

    Tests that use it read its study and registry; those that log (evaluate, export, report) add
    their own runs, so they assert only on what they logged themselves.
    """
    from kdlib.teacher import run_teacher
    from search.sweep import run_sweep

    folder = tmp_path_factory.mktemp("swept")
    with in_store(folder):
        run_teacher(swept_config())
        run_sweep(swept_config())
        while mlflow.active_run():
            mlflow.end_run()
    return folder


@pytest.fixture
def in_swept(swept_store, monkeypatch):
    """This test's MLflow store and default Optuna journal are the swept ones."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{swept_store / 'mlflow.db'}")
    return swept_store


def swept_config(*overrides: str):
    from kdlib.configure import build_config, parse_overrides

    return build_config(SMOKE, parse_overrides([*SWEPT, *overrides]))
