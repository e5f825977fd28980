"""Command line: ``python -m kdlib <job> [--experiment FILE] [key=value | --key value ...]``.

MLproject entry points call this; ``mlflow run -P train.epochs=2`` arrives as ``--train.epochs 2``.
Errors the user can fix print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from kdlib.config import ExperimentConfig, build_config, parse_overrides
from kdlib.errors import KDError

DEFAULT_EXPERIMENT = "experiments/sst2-bert.yaml"


def _teacher(cfg: ExperimentConfig) -> None:
    from kdlib.teacher import run_teacher

    result = run_teacher(cfg)
    status = "now the champion" if result.promoted else "champion unchanged (the current champion is at least as accurate)"
    print(f"teacher: dev accuracy {result.dev_accuracy:.4f}; registered {result.model_name} version {result.version}, {status}")
    print(f"teacher logits: run {result.run_id}, artifact {result.logits_artifact}")
    print(f"see it with: mlflow ui   (load it: mlflow.pyfunc.load_model('models:/{result.model_name}@champion'))")


JOBS = {
    "teacher": _teacher,
    # The whole pipeline; for now the pipeline is the teacher.
    "main": _teacher,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlib", description="BERT knowledge-distillation jobs tracked in MLflow.")
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"experiment YAML (default {DEFAULT_EXPERIMENT})")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = build_config(args.experiment, parse_overrides(rest))
        JOBS[args.job](cfg)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
