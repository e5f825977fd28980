"""Benchmark: this project's sweep against the Hugging Face Trainer recipe (``search/benchmarks/trainer_recipe.py``).

Same data, teacher, student initialisation, search space, sampler seed (the same settings trial for
trial, ``search.study.TrialDraws``, whatever the project's local workers; by default the project's first
trial runs the configured settings instead, ``search.start_from_config=false`` draws it too), pruner,
precision and number of trials; one host, one command, so the speed-up is one ratio of two figures
measured back to back:

    python -m search.benchmarks.side_by_side [--experiment FILE] [--project-only KEY=VALUE ...] [KEY=VALUE ...]   # default experiments/sst2-minilm.yaml

``--project-only`` settings go to this project's sweep alone, for what the recipe has no counterpart to (a transfer
set: ``--project-only distill.transfer.copies=4``); the comparison is then no longer like for like, and the JSON and
the table name them.

The teacher is the experiment's champion, fine-tuned first if there is none; its fine-tuning is in
neither figure. This project's figure is the sweep job end to end (plain twin off: the recipe has
none) plus the teacher's logit pass that the sweep reads, which the recipe does not need (and the
transfer set's making, where ``--project-only`` gives one). The recipe's figure is ``run_recipe`` end
to end. The two best trials (each chosen on validation) are
compared sentence by sentence on the evaluation split (``kdlib.metrics.paired_gain``: the difference,
its 95% paired-bootstrap interval and McNemar p), since single accuracies on a few hundred sentences
differ by chance. Writes ``outputs/bench/<name>-side-by-side.json`` and prints a markdown table.

One run is one draw: which settings the sampler draws and which trials the pruners stop move both
figures by more than their difference. ``--seeds 0 1 2 3 4`` runs the comparison once per sampler
seed (``search.seed``; with ``--vary-training-seed`` each run also trains both sides with
``distill.train.seed`` + that seed), then summarises the runs: the speed-ups' range and the mean
evaluation difference with its 95% t interval over the runs. Writes
``outputs/bench/<name>-side-by-side-seeds.json`` (every run and the summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kdlib import logits_cache, registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.configure import build_config, parse_overrides, replace
from kdlib.data import load_split
from kdlib.errors import KDError, interrupt_on
from kdlib.metrics import paired_gain
from kdlib.student import EVAL_LOGITS, prepare, transfer_data
from kdlib.teacher import run_teacher
from search.benchmarks import trainer_recipe
from search.benchmarks.bench import OUT
from search.study import TRIAL_TAG, trial_runs
from search.sweep import run_sweep

DEFAULT_EXPERIMENT = "experiments/sst2-minilm.yaml"
PROJECT_ONLY_SECTIONS = ("distill.", "search.")


def _champion_teacher(cfg: ExperimentConfig):
    name = registry.teacher_model_name(cfg)
    if registry.champion(name) is None:
        run_teacher(cfg)
    return registry.champion(name)


def _transfer_set_seconds(cfg: ExperimentConfig) -> float:
    """Seconds making and labelling the project's transfer set took (0 without one). The set is made, or
    fetched from the teacher's run, before the sweep's clock starts and counted at the cost recorded when
    it was made, as the teacher's logit pass is: so every run of the benchmark pays for it once."""
    if not cfg.distill.transfer.enabled:
        return 0.0
    with tempfile.TemporaryDirectory() as workdir:
        info = transfer_data(cfg, prepare(cfg, workdir)).info
    return info["augment_seconds"] + info["label_seconds"]


def compare(cfg: ExperimentConfig, project_only: dict[str, str] | None = None) -> dict:
    """Both sweeps, timed, ``project_only`` overrides applied to this project's alone; their figures."""
    project_only = project_only or {}
    trainer_recipe.check(cfg)
    shared = [key for key in project_only if not key.startswith(PROJECT_ONLY_SECTIONS)]
    if shared:
        # the data, teacher and student are what both sides must share for their figures to compare
        raise KDError(f"--project-only {', '.join(shared)}: expected keys under {' or '.join(PROJECT_ONLY_SECTIONS)}")
    # A new study each time: rerunning an existing one would resume it and time nothing.
    ours_cfg = replace(
        cfg, {**project_only, "search.plain_baseline": False, "search.study_name": f"{cfg.name}-side-by-side-{time.strftime('%Y%m%d-%H%M%S')}"}
    )
    teacher = _champion_teacher(cfg)
    logits_s = tracking.get_run(teacher.run_id).data.metrics.get(logits_cache.SECONDS_METRIC)
    if logits_s is None:
        raise KDError(
            f"teacher {teacher.name} version {teacher.version} has no {logits_cache.SECONDS_METRIC} metric (made by an older version); rerun the teacher job"
        )
    transfer_s = _transfer_set_seconds(ours_cfg)
    started = time.perf_counter()
    sweep = run_sweep(ours_cfg)
    sweep_s = time.perf_counter() - started
    started = time.perf_counter()
    recipe = trainer_recipe.run_recipe(cfg, str(teacher.version))
    recipe_s = time.perf_counter() - started
    best = recipe.best_trial
    trials = trial_runs(cfg.name, sweep.study_name)  # every local worker's, not only the launcher's
    difference = None
    if sweep.best_run_id is not None and best is not None:
        labels = load_split(cfg.data, cfg.data.eval_split, cfg.data.max_eval_examples).labels
        # each side's best logits where its run keeps them: the project's best trial run, the recipe's run
        bests = [tracking.load_array(run_id, EVAL_LOGITS) for run_id in (sweep.best_run_id, recipe.run_id)]
        difference = dataclasses.asdict(paired_gain(*bests, labels, seed=cfg.search.seed))
    results = {
        "experiment": cfg.name,
        "n_trials": cfg.search.n_trials,
        "searched": list(cfg.search.space),
        "project_only": project_only,
        "teacher_version": str(teacher.version),
        "project": {
            "study_name": ours_cfg.search.study_name,
            "sweep_run_id": sweep.run_id,
            "wall_s": sweep_s + logits_s + transfer_s,
            "sweep_s": sweep_s,
            "teacher_logits_s": logits_s,
            "transfer_set_s": transfer_s,
            "finished": sum(registry.EVAL_METRIC in run.data.metrics for run in trials),
            "best_val_accuracy": sweep.best_value,
            "best_eval_accuracy": sweep.best_eval_accuracy,
            "best_params": sweep.best_params,
            "best_run_id": sweep.best_run_id,
            "trials": {
                run.data.tags[TRIAL_TAG]: [run.data.metrics.get(registry.METRIC), run.data.metrics.get(registry.EVAL_METRIC)] for run in trials
            },
        },
        "trainer_recipe": {
            "run_id": recipe.run_id,
            "wall_s": recipe_s,
            "finished": len(recipe.finished),
            "best_val_accuracy": recipe.finished[best][0] if best is not None else None,
            "best_eval_accuracy": recipe.finished[best][1] if best is not None else None,
            "best_params": recipe.sampled[best] if best is not None else {},
            "sampled": {str(number): params for number, params in recipe.sampled.items()},
            "trials": {str(number): list(accuracies) for number, accuracies in recipe.finished.items()},
        },
        "speed_up": recipe_s / (sweep_s + logits_s + transfer_s),
        # best trial against best trial on the evaluation split: the project's minus the recipe's
        "eval_difference": difference,
    }
    return results


def _path(cfg: ExperimentConfig, seeds: bool) -> Path:
    """``outputs/bench/<name>-side-by-side.json``, or ``...-side-by-side-seeds.json`` for a series."""
    return OUT / f"{cfg.name}-side-by-side{'-seeds' if seeds else ''}.json"


def write(cfg: ExperimentConfig, results: dict, seeds: bool) -> Path:
    path = _path(cfg, seeds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path


def over_seeds(cfg: ExperimentConfig, project_only: dict[str, str], seeds: list[int], vary_training_seed: bool) -> dict:
    """``compare`` once per sampler seed, in order, then ``summarize``. Each run's table is printed as it
    ends, and ``outputs/bench/<name>-side-by-side-seeds.json`` is rewritten with the runs so far, so an
    interrupted series keeps what it measured."""
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise KDError(f"--seeds {' '.join(map(str, seeds))}: expected two or more different sampler seeds")
    runs = []
    for seed in seeds:
        training = cfg.distill.train.seed + seed if vary_training_seed else cfg.distill.train.seed
        run = compare(replace(cfg, {"search.seed": seed, "distill.train.seed": training}), project_only)
        runs.append({"search_seed": seed, "training_seed": training} | run)
        print(f"sampler seed {seed}, training seed {training}:\n{markdown(run)}\n", flush=True)
        results = {"runs": runs, "summary": summarize(runs)}
        write(cfg, results, seeds=True)
    return results


def summarize(runs: list[dict]) -> dict:
    """The speed-ups' range and median, and the evaluation difference's mean with its 95% t interval
    over the runs that finished a trial on both sides (each run's own interval is in its ``eval_difference``)."""
    from scipy import stats

    speed_ups = [run["speed_up"] for run in runs]
    differences = [run["eval_difference"]["difference"] for run in runs if run["eval_difference"] is not None]
    summary = {
        "runs": len(runs),
        "speed_up_min": min(speed_ups),
        "speed_up_median": statistics.median(speed_ups),
        "speed_up_max": max(speed_ups),
        "compared": len(differences),
        "eval_difference_mean": statistics.fmean(differences) if differences else None,
        "eval_difference_low": None,
        "eval_difference_high": None,
    }
    if len(differences) >= 2:
        interval = stats.ttest_1samp(differences, 0.0).confidence_interval(0.95)
        summary |= {"eval_difference_low": float(interval.low), "eval_difference_high": float(interval.high)}
    return summary


def seeds_markdown(results: dict) -> str:
    """One row per run, then the summary line."""
    rows = [
        "| sampler / training seed | speed-up | trials finished, project / recipe | best evaluation, project / recipe "
        "| evaluation, project's best minus recipe's (95% paired interval; McNemar p) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        ours, theirs = run["project"], run["trainer_recipe"]
        best = " / ".join(_accuracies(side, "best_eval_accuracy") for side in (ours, theirs))
        rows.append(
            f"| {run['search_seed']} / {run['training_seed']} | {run['speed_up']:.2f}x | {ours['finished']} / {theirs['finished']} | {best} "
            f"| {_difference(run['eval_difference'])} |"
        )
    summary = results["summary"]
    line = f"speed-up {summary['speed_up_min']:.2f}-{summary['speed_up_max']:.2f}x (median {summary['speed_up_median']:.2f}x) over {summary['runs']} runs"
    if summary["eval_difference_low"] is not None:
        line += (
            f"; evaluation, project's best minus recipe's: mean {100 * summary['eval_difference_mean']:+.2f} points "
            f"(95% t interval {100 * summary['eval_difference_low']:+.2f} to {100 * summary['eval_difference_high']:+.2f}) over {summary['compared']} runs"
        )
    return "\n".join([*rows, "", line])


def _difference(gain: dict | None) -> str:
    """A run's ``eval_difference`` in words."""
    if gain is None:
        return "no finished trial on a side"
    points = {key: 100 * gain[key] for key in ("difference", "low", "high")}
    return (
        f"{points['difference']:+.2f} points ({points['low']:+.2f} to {points['high']:+.2f}; p = {gain['p_value']:.3f}; "
        f"{gain['a_only']} sentences only the project's gets right, {gain['b_only']} only the recipe's)"
    )


def _accuracies(side: dict, *keys: str) -> str:
    """A side's best-trial accuracies under ``keys``, as "0.8500 / 0.8400", or "none finished"."""
    return "none finished" if side[keys[0]] is None else " / ".join(f"{side[key]:.4f}" for key in keys)


def markdown(results: dict) -> str:
    ours, theirs = results["project"], results["trainer_recipe"]

    rows = [
        (
            "end-to-end wall time",
            f"{ours['wall_s']:.0f} s (sweep {ours['sweep_s']:.0f} s + teacher logits {ours['teacher_logits_s']:.0f} s"
            + (f" + transfer set {ours['transfer_set_s']:.0f} s)" if ours["transfer_set_s"] else ")"),
            f"{theirs['wall_s']:.0f} s",
        ),
        (
            "trials finished (of n_trials; the others pruned)",
            f"{ours['finished']} of {results['n_trials']}",
            f"{theirs['finished']} of {results['n_trials']}",
        ),
        ("best trial: validation / evaluation accuracy", *(_accuracies(side, "best_val_accuracy", "best_eval_accuracy") for side in (ours, theirs))),
        ("best trial against best trial, evaluation accuracy (95% paired interval; McNemar p)", _difference(results["eval_difference"]), ""),
        ("**speed-up**", f"**{results['speed_up']:.2f}x**", "1x"),
    ]
    if results["project_only"]:
        given = ", ".join(f"`{key}={value}`" for key, value in results["project_only"].items())
        rows.insert(0, ("settings only this project's sweep took (not like for like)", given, "none"))
    return "\n".join(["| | this project | Trainer recipe |", "| --- | --- | --- |", *[f"| {a} | {b} | {c} |" for a, b, c in rows]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.benchmarks.side_by_side", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--project-only", action="append", default=[], metavar="KEY=VALUE", help="a setting for this project's sweep alone")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="run once per sampler seed (search.seed), then summarise the runs")
    parser.add_argument(
        "--vary-training-seed", action="store_true", help="with --seeds: both sides also train with distill.train.seed + the sampler seed"
    )
    args, rest = parser.parse_known_args(argv)
    kept = ""  # what an interrupted command keeps: a series, the runs it finished
    try:
        if args.vary_training_seed and not args.seeds:
            raise KDError("--vary-training-seed: expected --seeds too (it adds each run's sampler seed to distill.train.seed)")
        cfg = build_config(args.experiment, parse_overrides(rest))
        project_only = parse_overrides(args.project_only)
        interrupt_on(signal.SIGTERM)  # stopped by kill as by Ctrl-C: every run it opened ends, none left RUNNING
        if args.seeds:
            kept = f"; the runs finished so far are in {_path(cfg, seeds=True)}"
            print(seeds_markdown(over_seeds(cfg, project_only, args.seeds, args.vary_training_seed)))
        else:
            results = compare(cfg, project_only)
            write(cfg, results, seeds=False)
            print(markdown(results))
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; every MLflow run it opened has ended{kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
