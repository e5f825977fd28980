"""Command line: ``python -m kdlib <job> [--experiment FILE] [key=value | --key value ...]``.

MLproject entry points call this; ``mlflow run -P train.epochs=2`` arrives as ``--train.epochs 2``.
Errors the user can fix print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kdlib.config import ExperimentConfig, build_config, parse_overrides
from kdlib.errors import KDError

DEFAULT_EXPERIMENT = "experiments/sst2-bert.yaml"


def teacher_job(cfg: ExperimentConfig) -> None:
    from kdlib.teacher import run_teacher

    result = run_teacher(cfg)
    status = "now the champion" if result.promoted else "champion unchanged (the current champion is at least as accurate)"
    print(f"teacher: dev accuracy {result.dev_accuracy:.4f}; registered {result.model_name} version {result.version}, {status}")
    print(f"teacher logits: run {result.run_id}, artifact {result.logits_artifact}")
    print(f"see it with: mlflow ui   (load it: mlflow.pyfunc.load_model('models:/{result.model_name}@champion'))")


def _distill(cfg: ExperimentConfig) -> None:
    from kdlib.distill import run_distill, student_model_name

    result, version, promoted = run_distill(cfg)
    status = "now the champion" if promoted else "champion unchanged (the current champion is at least as accurate)"
    print(f"student: dev accuracy {result.dev_accuracy:.4f}; registered {student_model_name(cfg)} version {version}, {status}")


JOBS = {
    "teacher": teacher_job,
    "distill": _distill,
}


def run(prog: str, jobs: dict[str, Callable[[ExperimentConfig], None]], argv: list[str] | None, aliases: dict[str, str] | None = None) -> int:
    """Parse ``<job> [--experiment FILE] [overrides]``, build the config, run the job; KDError -> one line, exit 2.

    ``aliases`` map short override names to config keys (``n_trials`` -> ``search.n_trials``).
    """
    parser = argparse.ArgumentParser(prog=prog, description="BERT knowledge-distillation jobs tracked in MLflow.")
    parser.add_argument("job", choices=sorted(jobs))
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"experiment YAML (default {DEFAULT_EXPERIMENT})")
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = {(aliases or {}).get(key, key): value for key, value in parse_overrides(rest).items()}
        cfg = build_config(args.experiment, overrides)
        jobs[args.job](cfg)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run("python -m kdlib", JOBS, argv)


if __name__ == "__main__":
    sys.exit(main())
