"""The entry module: ``python -m kdlib <job> [--experiment FILE] [--print-config] [key=value | --key value ...]``.

Every MLproject entry point calls this; ``mlflow run -P train.epochs=2`` arrives as ``--train.epochs 2``.
It owns the jobs, their short names (``n_trials`` for ``search.n_trials``) and the order of the
whole pipeline (teacher -> sweep -> report). It sits at the top of the flow: it imports the jobs of
kdlib, search and reports, and nothing imports it. Errors the user can fix print one line and exit
with status 2 (130 for Ctrl-C or SIGTERM), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from kdlib.config import ExperimentConfig
from kdlib.configure import build_config, parse_overrides, replace, settings, shown, to_yaml
from kdlib.errors import KDError, interrupt_on

DEFAULT_EXPERIMENT = "experiments/sst2-bert.yaml"
PROG = "python -m kdlib"
SEARCH_KEYS = tuple(f"search.{name}" for name in ("n_trials", "timeout", "study_name", "storage", "pruner", "seed", "workers"))
REPORT_KEYS = ("report.output_dir", "report.top_k")
EVALUATE_KEYS = tuple(f"evaluate.{name}" for name in ("model_uri", "split", "teacher_uri", "precision", "threads"))
NEXT_STEP = "see it with: mlflow ui   (then open http://127.0.0.1:5000)"


# Each job imports its modules when it runs, so --help and --print-config answer at once, without
# loading torch, transformers or mlflow.


def _status(promoted: bool) -> str:
    return "now the champion" if promoted else "champion unchanged (the current champion is at least as accurate)"


def _accuracies(val_accuracy: float, eval_accuracy: float) -> str:
    return f"validation accuracy {val_accuracy:.4f}, evaluation accuracy {eval_accuracy:.4f} (gap {val_accuracy - eval_accuracy:+.4f})"


def teacher_job(cfg: ExperimentConfig) -> None:
    from kdlib import registry
    from kdlib.teacher import run_teacher

    result = run_teacher(cfg)
    print(
        f"teacher: {_accuracies(result.val_accuracy, result.eval_accuracy)}; registered {result.model_name} version {result.version}, {_status(result.promoted)}"
    )
    print(f"teacher logits: run {result.run_id}, artifact {result.logits_artifact}")
    print(f"{NEXT_STEP}; load it: mlflow.pyfunc.load_model('{registry.champion_uri(result.model_name)}')")


def distill_job(cfg: ExperimentConfig) -> None:
    from kdlib import registry
    from kdlib.distill import run_distill

    result, version, promoted = run_distill(cfg)
    print(
        f"student: {_accuracies(result.val_accuracy, result.eval_accuracy)}; registered {registry.student_model_name(cfg)} version {version}, {_status(promoted)}"
    )


def sweep_job(cfg: ExperimentConfig) -> None:
    """The sweep, then its report."""
    from kdlib import registry
    from search.sweep import run_sweep

    result = run_sweep(cfg)
    print(f"sweep: study {result.study_name!r} in {result.storage}: {result.finished} of {cfg.search.n_trials} trials finished")
    if result.best_value is None:
        print("sweep: no trial finished, so no student was registered")
    else:
        name = registry.student_model_name(cfg)
        print(
            f"best student: {_accuracies(result.best_value, result.best_eval_accuracy)} with {result.best_params}; "
            f"registered {name} version {result.version}, {_status(result.promoted)}"
        )
        print(f"{NEXT_STEP} (the sweep run holds one child run per trial)")
        print(f"load the champion: mlflow.pyfunc.load_model('{registry.champion_uri(name)}').predict(['a gorgeous, witty film'])")
    report_job(cfg)


def report_job(cfg: ExperimentConfig) -> None:
    from reports.report import build_report

    report = build_report(cfg)
    print(f"report: {report.html.resolve()} (open it in a browser; it needs no network) and {report.csv.resolve()}")
    print(f"logged on the sweep run {report.sweep_run_id} under report/")


def main_job(cfg: ExperimentConfig) -> None:
    """The whole pipeline: the teacher when the experiment has no champion teacher yet, then the sweep and its report."""
    from kdlib import registry

    if registry.champion(registry.teacher_model_name(cfg)) is None:
        teacher_job(cfg)
    sweep_job(cfg)


def evaluate_job(cfg: ExperimentConfig) -> None:
    from kdlib.evaluate import run_evaluate, table

    result = run_evaluate(cfg)
    print(table([result]))
    print(f"logged as run {result.run_id}")


def export_job(cfg: ExperimentConfig) -> None:
    from kdlib.export import run_export

    result = run_export(cfg)
    acc = result.accuracy
    print(f"export of {result.source_uri}: ONNX Runtime fp32 and optimized logits within {result.max_abs_diff:.2e} of PyTorch")
    print(
        f"evaluation split ({cfg.data.eval_split}) accuracy: PyTorch {acc['pytorch']:.4f}, ONNX fp32 {acc['fp32']:.4f}, "
        f"ONNX optimized {acc['optimized']:.4f}, ONNX int8 ({cfg.export.int8_scheme}) {acc['int8']:.4f}"
    )
    print(f"ONNX Runtime fused: {', '.join(f'{op} x{n}' for op, n in result.fused.items()) or 'nothing'}")
    print(f"TensorRT: {result.tensorrt}")
    for kind, uri in result.model_uris.items():
        print(f"ONNX {kind}: mlflow.pyfunc.load_model({uri!r})  (run {result.run_id})")


def bench_job(cfg: ExperimentConfig) -> None:
    """A fresh teacher and a sweep (which ends with the plain student and the distillation gain), timed."""
    import torch

    from kdlib.precision import matmul_rate
    from kdlib.teacher import run_teacher
    from search.benchmarks.bench import markdown, summarize
    from search.sweep import run_sweep

    # Bounded to about a second each on any CPU, emulated bf16 included.
    peaks = {"bf16": matmul_rate(torch.bfloat16, budget_s=1.0), "fp32": matmul_rate(torch.float32, budget_s=1.0)}
    wall: dict[str, float] = {}
    started = time.perf_counter()
    teacher = run_teacher(cfg)
    wall["teacher"] = time.perf_counter() - started
    started = time.perf_counter()
    sweep = run_sweep(replace(cfg, {"search.plain_baseline": True}))  # the bench reports the distillation gain
    wall["sweep"] = time.perf_counter() - started
    print(markdown(summarize(cfg, peaks, wall, teacher, sweep)))


@dataclass(frozen=True)
class Job:
    run: Callable[[ExperimentConfig], None]
    summary: str
    short: tuple[str, ...] = ()  # config keys also reachable by their last part (-P n_trials=30)
    default_experiment: str = DEFAULT_EXPERIMENT


JOBS = {
    "main": Job(main_job, "the teacher if the experiment has no champion teacher yet, then the sweep and its report", SEARCH_KEYS + REPORT_KEYS),
    "teacher": Job(teacher_job, "fine-tune, register and promote the teacher; cache its logits"),
    "distill": Job(distill_job, "distil one student from the champion teacher's cached logits; register it"),
    "sweep": Job(
        sweep_job, "Optuna over the distillation settings, one MLflow run per trial, the champion student, then the report", SEARCH_KEYS + REPORT_KEYS
    ),
    "report": Job(report_job, "the sweep report: offline HTML and CSV, logged on the sweep run", SEARCH_KEYS + REPORT_KEYS),
    "evaluate": Job(evaluate_job, "accuracy, agreement with the teacher, size and latency of any model URI", EVALUATE_KEYS),
    "export": Job(export_job, "ONNX export checked against PyTorch, int8 quantization, two pyfunc models", ("export.model_uri",)),
    "bench": Job(bench_job, "teacher and fixed-seed sweep (with its plain student), timed", SEARCH_KEYS, "experiments/sst2-minilm.yaml"),
}


def short_names(job: Job) -> dict[str, str]:
    return {key.rpartition(".")[2]: key for key in job.short}


def job_help(name: str) -> str:
    """Every setting with its type, default and meaning, and the job's short names."""
    job = JOBS[name]
    lines = [
        f"usage: {PROG} {name} [--experiment FILE] [--print-config] [KEY=VALUE | --KEY VALUE ...]",
        "",
        f"{name}: {job.summary}.",
        "",
        f"--experiment FILE   experiment YAML holding what differs from the defaults (default {job.default_experiment})",
        "--print-config      print the merged config (defaults, experiment file, overrides) as YAML and exit",
        "KEY=VALUE           set any setting below; with mlflow run: -P KEY=VALUE",
    ]
    if job.short:
        lines += ["", "short names:", *(f"  {short} = {key}" for short, key in short_names(job).items())]
    lines += ["", "settings (KEY  type, default: meaning):"]
    for key, kind, default, meaning in settings():
        lines.append(f"  {key}  {kind}, default {shown(default)}: {meaning}")
    return "\n".join(lines)


def _quiet_progress_bars() -> None:
    """Per-file download and weight-loading bars would flood the job's log with nothing its own lines lack.

    MLflow's come back with MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Parse, build the config, run the job; KDError -> one line, exit 2; Ctrl-C or SIGTERM -> one line, exit 130."""
    jobs = "\n".join(f"  {name:9} {job.summary}" for name, job in JOBS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=f"BERT knowledge-distillation jobs tracked in MLflow.\n\njobs:\n{jobs}\n\n`{PROG} JOB --help` lists every setting.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        add_help=False,
    )
    parser.add_argument("job", nargs="?", choices=sorted(JOBS))
    parser.add_argument("--experiment")
    parser.add_argument("--print-config", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.job is None:
        if args.help:
            parser.print_help()
            return 0
        print(f"{parser.format_usage()}error: name a job; `{PROG} --help` lists them", file=sys.stderr)
        return 2
    if args.help:
        print(job_help(args.job))
        return 0
    job = JOBS[args.job]
    try:
        short = short_names(job)
        overrides = {short.get(key, key): value for key, value in parse_overrides(rest).items()}
        cfg = build_config(args.experiment or job.default_experiment, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        _quiet_progress_bars()
        interrupt_on(signal.SIGTERM)
        job.run(cfg)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
