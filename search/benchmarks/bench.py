"""Benchmark figures of one teacher + sweep + plain student run on one experiment.

The entry module's ``bench`` job runs the teacher and a fixed-seed sweep, which ends with the plain
fine-tuned student (alpha = 0, no transfer set, the best trial's other settings), timing each; ``summarize`` turns that into
``outputs/bench/<name>.json`` and a markdown table. Throughput is set against this machine's
matrix-product peaks, measured in the same process, so the share of peak is comparable across machines.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from kdlib import precision, tracking
from kdlib.config import ExperimentConfig
from search.study import trial_runs

OUT = Path("outputs") / "bench"


def trial_throughput(experiment: str, study_name: str) -> tuple[float, float, float]:
    """(training examples, training seconds, training FLOPs) summed over the study's trial runs.

    FLOPs count 6 per non-embedding parameter per token (forward and backward) over each epoch a
    trial ran, with that trial's own tokens (a transfer set multiplies them).
    """
    examples, seconds, flops = 0.0, 0.0, 0.0
    for run in trial_runs(experiment, study_name):
        params = run.data.params
        per_epoch = 6 * int(params["non_embedding_parameters"]) * int(params["train_tokens"])
        rates = tracking.metric_history(run.info.run_id, "train_examples_per_s")
        for step, spent in tracking.metric_history(run.info.run_id, "train_seconds").items():
            seconds += spent
            examples += rates[step] * spent
            flops += per_epoch
    return examples, seconds, flops


def transfer_cost(experiment: str, study_name: str) -> tuple[float, int, int]:
    """The transfer sets the study's trials used, each set once: seconds spent making and labelling
    them, their augmented copies and their unlabelled sentences."""
    sets = {}
    for run in trial_runs(experiment, study_name):
        params = run.data.params
        if "transfer.digest" in params:
            seconds = float(params["transfer.augment_seconds"]) + float(params["transfer.label_seconds"])
            sets[params["transfer.digest"]] = (seconds, int(params["transfer.copies"]), int(params["transfer.unlabelled"]))
    return tuple(map(sum, zip(*sets.values(), strict=True))) if sets else (0.0, 0, 0)


def summarize(cfg: ExperimentConfig, peaks: dict[str, float], wall_s: dict[str, float], teacher, sweep) -> dict:
    """The bench's figures from the teacher and sweep jobs' results."""
    examples, seconds, flops = trial_throughput(cfg.name, sweep.study_name)
    plain = sweep.baseline
    student = tracking.get_run(plain.run_id).data.params  # what every student logs about its data and size
    labelling, copies, unlabelled = transfer_cost(cfg.name, sweep.study_name)
    achieved = flops / seconds if seconds else 0.0
    epochs_range = cfg.search.space.get("distill.train.epochs")
    results = {
        "experiment": cfg.name,
        "n_train": int(student["n_train"]),
        "n_trials": sweep.finished,
        "epoch_range": [epochs_range.low, epochs_range.high] if epochs_range else None,
        "threads": torch.get_num_threads(),
        "mixed_precision": precision.resolve(cfg.distill.train.mixed_precision).mixed_precision,
        "wall_s": wall_s,
        "trials_per_hour": sweep.finished / (wall_s["sweep"] / 3600),
        "student_train_examples_per_s": examples / seconds if seconds else 0.0,
        "student_train_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peaks,
        "share_of_peak": {k: achieved / v for k, v in peaks.items()},
        "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "transfer_set_copies": copies,
        "transfer_set_unlabelled": unlabelled,
        "transfer_set_seconds": labelling,
        "transfer_set_share_of_sweep": labelling / wall_s["sweep"],
        "teacher_val_accuracy": teacher.val_accuracy,
        "teacher_eval_accuracy": teacher.eval_accuracy,
        "best_student_val_accuracy": sweep.best_value,
        "best_student_eval_accuracy": sweep.best_eval_accuracy,
        "best_student_params": sweep.best_params,
        "plain_student_val_accuracy": plain.val_accuracy,
        "plain_student_eval_accuracy": plain.eval_accuracy,
        "distillation_gain_points": 100 * plain.gain.difference,
        "distillation_gain_interval_points": [100 * plain.gain.low, 100 * plain.gain.high],
        "distillation_gain_mcnemar_p": plain.gain.p_value,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{cfg.name}.json").write_text(json.dumps(results, indent=2))
    return results


def markdown(results: dict) -> str:
    wall = results["wall_s"]
    rows = [
        ("training sentences", f"{results['n_train']:,}"),
        ("transfer set: augmented copies + unlabelled sentences", f"{results['transfer_set_copies']:,} + {results['transfer_set_unlabelled']:,}"),
        ("trials (epoch range)", f"{results['n_trials']} ({results['epoch_range']})"),
        ("wall time: teacher / sweep (plain student included)", f"{wall['teacher']:.0f} s / {wall['sweep']:.0f} s"),
        (
            "transfer set: making and labelling (share of the sweep)",
            f"{results['transfer_set_seconds']:.0f} s ({results['transfer_set_share_of_sweep']:.1%})",
        ),
        ("trials per hour", f"{results['trials_per_hour']:.1f}"),
        ("student training examples/s", f"{results['student_train_examples_per_s']:.0f}"),
        (
            "student training FLOP/s (share of bf16 / fp32 matmul peak)",
            f"{results['student_train_flops_per_s'] / 1e9:.1f} G ({results['share_of_peak']['bf16']:.1%} / {results['share_of_peak']['fp32']:.1%})",
        ),
        ("peak memory", f"{results['peak_memory_gib']:.2f} GiB"),
        ("teacher accuracy: validation / evaluation", f"{results['teacher_val_accuracy']:.4f} / {results['teacher_eval_accuracy']:.4f}"),
        (
            "best distilled student: validation / evaluation",
            f"{results['best_student_val_accuracy']:.4f} / {results['best_student_eval_accuracy']:.4f}",
        ),
        (
            "plain student (alpha = 0, no transfer set, same budget): validation / evaluation",
            f"{results['plain_student_val_accuracy']:.4f} / {results['plain_student_eval_accuracy']:.4f}",
        ),
        (
            "distillation gain on evaluation (95% interval; McNemar p)",
            f"{results['distillation_gain_points']:+.2f} points ({results['distillation_gain_interval_points'][0]:+.2f} to "
            f"{results['distillation_gain_interval_points'][1]:+.2f}; p = {results['distillation_gain_mcnemar_p']:.3f})",
        ),
    ]
    return "\n".join(["| measure | value |", "| --- | --- |", *[f"| {a} | {b} |" for a, b in rows]])
