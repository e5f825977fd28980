"""``python -m search sweep|main --experiment FILE [n_trials=30 ...]``: the sweep and the whole pipeline."""

from __future__ import annotations

import sys

from kdlib import tracking
from kdlib.cli import run, teacher_job
from kdlib.config import ExperimentConfig
from kdlib.errors import KDError
from kdlib.teacher import teacher_model_name

# `mlflow run . -e sweep -P n_trials=30` arrives as `--n_trials 30`.
SEARCH = {name: f"search.{name}" for name in ("n_trials", "timeout", "study_name", "storage", "pruner", "seed")}


def _sweep(cfg: ExperimentConfig) -> None:
    from search.sweep import run_sweep

    result = run_sweep(cfg)
    print(f"sweep: study {result.study_name!r} in {result.storage}: {result.finished} of {cfg.search.n_trials} trials finished")
    if result.best_value is None:
        print("sweep: no trial finished, so no student was registered")
        return
    status = "now the champion" if result.promoted else "champion unchanged (the current champion is at least as accurate)"
    print(
        f"best student: dev accuracy {result.best_value:.4f} with {result.best_params}; registered {cfg.name}-student version {result.version}, {status}"
    )
    print(f"next: run `mlflow ui` here and open http://127.0.0.1:5000 (experiment {cfg.name!r}: the sweep run holds one child run per trial)")
    print(f"load the champion: mlflow.pyfunc.load_model('models:/{cfg.name}-student@champion').predict(['a gorgeous, witty film'])")


def _main(cfg: ExperimentConfig) -> None:
    """The whole pipeline: the teacher when the experiment has no champion teacher yet, then the sweep."""
    try:
        tracking.champion_version(teacher_model_name(cfg), "")
    except KDError:
        teacher_job(cfg)
    _sweep(cfg)


def _bench(cfg: ExperimentConfig) -> None:
    from search.bench import markdown, run_bench

    print(markdown(run_bench(cfg)))


JOBS = {"sweep": _sweep, "main": _main, "bench": _bench}
ALIASES = dict.fromkeys(JOBS, SEARCH)

if __name__ == "__main__":
    sys.exit(run("python -m search", JOBS, sys.argv[1:], ALIASES))
