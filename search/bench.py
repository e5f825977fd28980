"""Benchmark: the teacher, a fixed-seed sweep and a plain fine-tuned student on one experiment.

``python -m search bench --experiment experiments/sst2-minilm.yaml data.max_train_examples=8000
n_trials=6 search.space.distill.train.epochs.high=3`` writes ``outputs/bench/<name>.json`` and prints
a markdown table. Throughput is set against this machine's matrix-product peaks, measured in the
same process, so the share of peak is comparable across machines.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from kdlib import tracking
from kdlib.config import ExperimentConfig, replace
from kdlib.distill import log_student_run
from kdlib.student import prepare
from kdlib.teacher import run_teacher
from search.sweep import run_sweep

OUT = Path("outputs") / "bench"


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """Achieved FLOP/s of an n x n matrix product in ``dtype``: the practical ceiling for training."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - started)


def _non_embedding_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def _trial_runs(sweep_run_id: str):
    client = MlflowClient()
    experiment = client.get_run(sweep_run_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{sweep_run_id}' and tags.`kd.role` = 'student-trial'")


def run_bench(cfg: ExperimentConfig) -> dict:
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    started = time.perf_counter()
    teacher = run_teacher(cfg)
    teacher_s = time.perf_counter() - started

    started = time.perf_counter()
    sweep = run_sweep(cfg)
    sweep_s = time.perf_counter() - started

    client = MlflowClient()
    examples, seconds, epochs = 0.0, 0.0, 0
    for run in _trial_runs(sweep.run_id):
        history = client.get_metric_history(run.info.run_id, "train_seconds")
        rates = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_examples_per_s")}
        for point in history:
            seconds += point.value
            examples += rates[point.step] * point.value
            epochs += 1

    # Same budget as the best trial, hard labels only: what distillation has to beat.
    best = sweep.best_params
    plain_cfg = replace(cfg, {**best, "distill.alpha": 0.0})
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        data = prepare(plain_cfg, tmp)
        started = time.perf_counter()
        with tracking.job_run(cfg.name, "plain-student", {"kd.role": "plain-student"}):
            plain = log_student_run(plain_cfg, data)
        plain_s = time.perf_counter() - started
        tokens_per_epoch = int(data.train.lengths.sum())
        student_params = _non_embedding_parameters(data.template.model)

    # Forward + backward of a transformer: ~6 FLOPs per non-embedding parameter per token.
    student_flops = 6 * student_params * tokens_per_epoch * epochs
    achieved = student_flops / seconds if seconds else 0.0
    results = {
        "experiment": cfg.name,
        "n_train": len(data.train),
        "n_trials": sweep.finished,
        "epoch_range": [cfg.search.space["distill.train.epochs"].low, cfg.search.space["distill.train.epochs"].high]
        if "distill.train.epochs" in cfg.search.space
        else None,
        "threads": torch.get_num_threads(),
        "mixed_precision": cfg.distill.train.mixed_precision,
        "wall_s": {"teacher": teacher_s, "sweep": sweep_s, "plain_student": plain_s},
        "trials_per_hour": sweep.finished / (sweep_s / 3600),
        "student_train_examples_per_s": examples / seconds if seconds else 0.0,
        "student_train_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peaks,
        "share_of_peak": {k: achieved / v for k, v in peaks.items()},
        "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "teacher_dev_accuracy": teacher.dev_accuracy,
        "best_student_dev_accuracy": sweep.best_value,
        "best_student_params": best,
        "plain_student_dev_accuracy": plain.dev_accuracy,
        "distillation_gain_points": 100 * (sweep.best_value - plain.dev_accuracy),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{cfg.name}.json").write_text(json.dumps(results, indent=2))
    return results


def markdown(results: dict) -> str:
    wall = results["wall_s"]
    rows = [
        ("training sentences", f"{results['n_train']:,}"),
        ("trials (epoch range)", f"{results['n_trials']} ({results['epoch_range']})"),
        ("wall time: teacher / sweep / plain student", f"{wall['teacher']:.0f} s / {wall['sweep']:.0f} s / {wall['plain_student']:.0f} s"),
        ("trials per hour", f"{results['trials_per_hour']:.1f}"),
        ("student training examples/s", f"{results['student_train_examples_per_s']:.0f}"),
        (
            "student training FLOP/s (share of bf16 / fp32 matmul peak)",
            f"{results['student_train_flops_per_s'] / 1e9:.1f} G ({results['share_of_peak']['bf16']:.1%} / {results['share_of_peak']['fp32']:.1%})",
        ),
        ("peak memory", f"{results['peak_memory_gib']:.2f} GiB"),
        ("teacher dev accuracy", f"{results['teacher_dev_accuracy']:.4f}"),
        ("best distilled student dev accuracy", f"{results['best_student_dev_accuracy']:.4f}"),
        ("plain fine-tuned student (alpha = 0, same budget)", f"{results['plain_student_dev_accuracy']:.4f}"),
    ]
    return "\n".join(["| measure | value |", "| --- | --- |", *[f"| {a} | {b} |" for a, b in rows]])
