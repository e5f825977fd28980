"""Command line: ``python -m kdlib <job> [--experiment FILE] [key=value | --key value ...]``.

MLproject entry points call this; ``mlflow run -P train.epochs=2`` arrives as ``--train.epochs 2``.
Errors the user can fix print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
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


def _evaluate(cfg: ExperimentConfig) -> None:
    from kdlib.evaluate import run_evaluate, table

    result = run_evaluate(cfg)
    print(table([result]))
    print(f"logged as run {result.run_id} in experiment {cfg.name!r}")


def _export(cfg: ExperimentConfig) -> None:
    from kdlib.export import run_export

    result = run_export(cfg)
    acc = result.accuracy
    print(f"export of {result.source_uri}: ONNX Runtime fp32 logits within {result.max_abs_diff:.2e} of PyTorch")
    print(f"{cfg.data.eval_split} accuracy: PyTorch {acc['pytorch']:.4f}, ONNX fp32 {acc['fp32']:.4f}, ONNX int8 {acc['int8']:.4f}")
    print(f"TensorRT: {result.tensorrt}")
    for kind, uri in result.model_uris.items():
        print(f"ONNX {kind}: mlflow.pyfunc.load_model({uri!r})  (run {result.run_id})")


JOBS = {
    "teacher": teacher_job,
    "distill": _distill,
    "evaluate": _evaluate,
    "export": _export,
}
# `mlflow run . -e evaluate -P model_uri=...` arrives as `--model_uri ...`.
ALIASES = {
    "evaluate": {name: f"evaluate.{name}" for name in ("model_uri", "split", "teacher_uri", "precision", "threads")},
    "export": {"model_uri": "export.model_uri"},
}


def _quiet_progress_bars() -> None:
    """Per-file download and weight-loading bars would flood the job's log with nothing its own lines lack.

    MLflow's come back with MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run(
    prog: str, jobs: dict[str, Callable[[ExperimentConfig], None]], argv: list[str] | None, aliases: dict[str, dict[str, str]] | None = None
) -> int:
    """Parse ``<job> [--experiment FILE] [overrides]``, build the config, run the job; KDError -> one line, exit 2.

    ``aliases`` map a job's short override names to config keys (sweep: ``n_trials`` -> ``search.n_trials``).
    """
    parser = argparse.ArgumentParser(prog=prog, description="BERT knowledge-distillation jobs tracked in MLflow.")
    parser.add_argument("job", choices=sorted(jobs))
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"experiment YAML (default {DEFAULT_EXPERIMENT})")
    args, rest = parser.parse_known_args(argv)
    try:
        short = (aliases or {}).get(args.job, {})
        overrides = {short.get(key, key): value for key, value in parse_overrides(rest).items()}
        cfg = build_config(args.experiment, overrides)
        _quiet_progress_bars()
        jobs[args.job](cfg)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run("python -m kdlib", JOBS, argv, ALIASES)


if __name__ == "__main__":
    sys.exit(main())
