"""The sweep job: an Optuna study that outlives the process, one parent MLflow run, a champion.

Rerunning the same command resumes the study and runs only the trials still missing to reach
``search.n_trials`` (finished or pruned). Several workers may share one study through one storage;
each worker's run nests under the sweep's first run, so ``mlflow ui`` shows one tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from kdlib import registry, threads, tracking
from kdlib.config import ExperimentConfig
from kdlib.configure import replace
from kdlib.errors import interrupt_on
from kdlib.models import count_parameters
from kdlib.student import StudentData, prepare
from kdlib.training import NonFiniteLoss, format_duration
from search import baseline, space
from search.objective import Objective, SurplusTrial
from search.study import (
    EVAL_ATTR,
    MODEL_ATTR,
    ROOT_ATTR,
    RUN_ATTR,
    STUDY_TAG,
    TRIAL_TAG,
    check_store,
    finished,
    has_room,
    make_storage,
    open_study,
    recover_dead_local_trials,
    register_worker,
    study_name,
    wait_for_others,
)


@dataclass(frozen=True)
class SweepResult:
    study_name: str
    storage: str
    run_id: str
    finished: int
    best_value: float | None  # validation accuracy of the best trial
    best_eval_accuracy: float | None
    best_params: dict
    best_run_id: str | None  # the best trial's MLflow run (its model, its evaluation logits)
    version: str | None
    promoted: bool
    baseline: baseline.Baseline | None  # the plain student and the distillation gain (search.plain_baseline)


def _attach_to_root(study: optuna.Study, run_id: str) -> str:
    """The sweep's first run is the root of its MLflow tree; later workers and resumes nest under it."""
    root = study.user_attrs.get(ROOT_ATTR)
    if root is None:
        study.set_user_attr(ROOT_ATTR, run_id)
        root = study.user_attrs.get(ROOT_ATTR, run_id)
    if root != run_id:
        tracking.nest_under(root)
    return root


def _log_best(study: optuna.Study, trial: FrozenTrial) -> None:
    if trial.state == TrialState.COMPLETE and study.best_trial.number == trial.number:
        evaluated = trial.user_attrs[EVAL_ATTR]
        tracking.log_metrics(
            {
                f"best_{registry.METRIC}": trial.value,
                f"best_{registry.EVAL_METRIC}": evaluated,
                f"best_{registry.GAP}": trial.value - evaluated,
                **{f"best.{k}": float(v) for k, v in trial.params.items() if isinstance(v, (int, float))},
            },
            step=trial.number,
        )
        tracking.set_tags({"best.trial": str(trial.number), "best.run_id": trial.user_attrs.get(RUN_ATTR, "")})


class _Progress:
    """One line per ended trial, for logs: its outcome, the study's count and this worker's ETA."""

    def __init__(self, objective: Objective):
        self.objective, self.n_trials = objective, objective.cfg.search.n_trials
        self.started, self.ran = time.perf_counter(), 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        place = self.objective.places.get(trial.number)
        if place is None:
            return  # a surplus trial: nothing ran
        self.ran += 1
        done = finished(study)
        if trial.state == TrialState.COMPLETE:
            outcome = f"finished: {registry.METRIC} {trial.value:.4f} ({registry.EVAL_METRIC} {trial.user_attrs[EVAL_ATTR]:.4f})"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned after epoch {trial.last_step}"
        else:
            outcome = trial.state.name.lower()
        took = trial.duration.total_seconds() if trial.duration else 0.0
        eta = (time.perf_counter() - self.started) / self.ran * max(self.n_trials - done, 0)
        print(
            f"trial {place}/{self.n_trials} (Optuna trial {trial.number}) {outcome} in {format_duration(took)}; "
            f"{done}/{self.n_trials} done, ETA {format_duration(eta)}",
            flush=True,
        )


@dataclass(frozen=True)
class Workers:
    """How many trial processes this command runs, why, and the machine's CPU threads they share."""

    count: int
    reason: str
    share: threads.Share

    @property
    def threads(self) -> int:
        """The CPU threads of each trial process while all of them train."""
        return self.share.part(self.count)


# Several trials on one GPU (reports/results.md, "Several trials on one GPU: the H200 measurements"): on an H200 one trial kept the GPU
# busy ~6% of a step, and 8 at once, 2 CPU threads each, did 6.8x the work of one (3.5x against the
# fastest single small-student trial seen); 8 was the most measured, and 1 thread each did less.
# A trial's GPU memory: its student's fp32 weights, gradients and AdamW's two moments (16 bytes a
# parameter), and room for activations and the process's CUDA context (an estimate, not a measured peak).
GPU_TRIALS = 8
GPU_THREADS_PER_TRIAL = 2
GPU_BYTES_PER_PARAMETER = 16
GPU_TRIAL_HEADROOM = 2 * 2**30


def local_workers(requested: int | None, left: int, parameters: int) -> Workers:
    """``search.workers`` on this machine, with ``left`` trials still to run, each training a student of
    ``parameters`` parameters. Null picks 2 on a CPU with 2 or more threads; on a GPU as many as fit
    (``GPU_TRIALS``; 2 CPU threads and its share of the free GPU memory each); never more than
    ``left`` (a process without a trial would only wait, holding threads).

    Two one-thread trials at once finish more trials per hour than one two-thread trial on a 2-core host
    (reports/results.md, "Several workers on one machine: the measurements"): the small students' matrices leave a second thread
    little to do. One trial leaves a GPU mostly idle, waiting on Python to launch its small kernels."""
    total = torch.get_num_threads()
    if requested is not None:
        count, reason = requested, "as configured"
    elif torch.cuda.is_available():
        free, per_trial = torch.cuda.mem_get_info()[0], GPU_BYTES_PER_PARAMETER * parameters + GPU_TRIAL_HEADROOM
        count = max(1, min(left, GPU_TRIALS, total // GPU_THREADS_PER_TRIAL, free // per_trial))
        reason = (
            f"auto: {count} trials share the GPU ({total} CPU threads, {free / 2**30:.0f} GiB free, "
            f"{per_trial / 2**30:.1f} GiB per trial, {left} trials left; at most {GPU_TRIALS})"
        )
    elif total < 2:
        count, reason = 1, "auto: one CPU thread"
    elif left < 2:
        count, reason = 1, "auto: fewer than 2 trials left to run"
    else:
        count, reason = 2, f"auto: {total} CPU threads; two trials at once finish more per hour than one with all threads"
    return Workers(count, reason, threads.Share.of(total, count))


def run_sweep(cfg: ExperimentConfig) -> SweepResult:
    """The sweep: ``local_workers`` trial processes on this machine share the study, the CPU threads
    split between those training (``kdlib/threads.py``). This process is one of them, waits for the others, and alone registers
    the best trial and moves the champion."""
    space.validate(cfg)
    threads = torch.get_num_threads()
    try:
        return _sweep(cfg, None)
    finally:
        torch.set_num_threads(threads)


def worker_seed(seed: int, index: int) -> int:
    """The sampler seed of local worker ``index`` (1, 2, ...) of a sweep seeded ``seed``. Not ``seed + index``:
    machines given seeds 0, 1, 2 would each start a local worker with the next machine's seed, and two
    TPE samplers with one seed propose the same settings from the same trials. Below 2**31, as the
    sampler adds the trial count. (The first trials' random draws follow the study's seed, not this.)"""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)


def _start_local_worker(cfg: ExperimentConfig, index: int, workers: Workers) -> multiprocessing.Process:
    # Spawned, not forked: a fork would copy this process's torch thread pools and MLflow state.
    worker = multiprocessing.get_context("spawn").Process(
        target=_local_worker, args=(replace(cfg, {"search.seed": worker_seed(cfg.search.seed, index)}), workers)
    )
    worker.start()
    return worker


def _local_worker(cfg: ExperimentConfig, workers: Workers) -> None:
    # Stopped by its launcher (SIGTERM) or by Ctrl-C with it: either way it unwinds once, as the launcher does.
    interrupt_on(signal.SIGTERM, signal.SIGINT)
    # Its own sweep run under the study's root: the launcher's run belongs to the first process.
    os.environ.pop(tracking.LAUNCHER_RUN, None)
    # Set before `_sweep` sets it again: its data preparation runs beside the launcher's first trial.
    torch.set_num_threads(workers.threads)
    _sweep(cfg, workers)


def _sweep(cfg: ExperimentConfig, workers: Workers | None) -> SweepResult | None:
    """One worker's part of the sweep. The launcher (``workers`` None) picks the local workers once the
    study is open, starts the others once its root run exists, waits for them, and alone registers the
    best trial; a local worker gets the launcher's pick and its share of the machine's threads."""
    launcher = workers is None
    storage, url = make_storage(cfg.search.storage)
    name = study_name(cfg)
    with tempfile.TemporaryDirectory(prefix="kd-sweep-") as tmp:
        data = prepare(cfg, tmp)
        study, created = open_study(cfg, storage)
        check_store(study)
        start = space.configured(cfg) if created and cfg.search.start_from_config else {}
        if start:
            study.enqueue_trial(start)  # by the study's creator alone, so it is queued once
        if launcher:
            workers = local_workers(cfg.search.workers, cfg.search.n_trials - finished(study), count_parameters(data.template.model))
            print(f"sweep: workers {workers.count} x threads {workers.threads} ({workers.reason})", flush=True)
        objective = Objective(cfg, data, name)
        progress = _Progress(objective)
        with tracking.job_run(cfg.name, registry.Role.SWEEP, {STUDY_TAG: name, "optuna.storage": url}) as run:
            _attach_to_root(study, run.info.run_id)
            register_worker(study, run.info.run_id)
            others = [_start_local_worker(cfg, i, workers) for i in range(1, workers.count)] if launcher else []
            with _stopping_on_failure(others):
                tracking.log_params(
                    {
                        "search.n_trials": cfg.search.n_trials,
                        "search.storage": url,
                        "search.study_name": name,
                        "search.pruner": cfg.search.pruner,
                        "search.seed": cfg.search.seed,
                        "search.workers": cfg.search.workers,
                        "search.local_workers": workers.count,
                        "search.threads_per_worker": workers.threads,
                        "search.workers_reason": workers.reason,
                        "search.space": json.dumps({key: dataclasses.asdict(param) for key, param in cfg.search.space.items()}),
                    }
                )
                deadline = time.monotonic() + cfg.search.timeout if cfg.search.timeout else None
                with threads.joined(workers.share):
                    _work(study, objective, deadline, [_log_best, progress])
                for worker in others:
                    worker.join()
            torch.set_num_threads(workers.share.threads)  # the plain student runs alone
            if not launcher:
                return None
            result = _promote_best(cfg, study, run.info.run_id, url, data)
    return result


@contextlib.contextmanager
def _stopping_on_failure(workers: list[multiprocessing.Process]) -> Iterator[None]:
    """Stop the launcher's local workers when it stops: killed (SIGTERM), interrupted or failed, the
    command ends whole, its workers' trials failed (and retried on resume) and their runs closed,
    instead of workers training on unseen. A worker that dies alone is another matter: the others retry its trial."""
    try:
        yield
    except BaseException:
        for worker in workers:
            worker.terminate()  # SIGTERM: the worker unwinds (``interrupt_on``)
        for worker in workers:
            worker.join()
        raise


def _work(study: optuna.Study, objective: Objective, deadline: float | None, callbacks: list) -> None:
    """Run trials until the study has n_trials finished or pruned ones, or time is up.

    A worker that finds every place taken does not leave while other workers' trials run: it waits,
    takes the retry of a trial whose worker died, and ends with the study. So every worker that ends
    sees the same best trial and registers the same model, never one that a running trial then beats.
    """
    n_trials, waiting = objective.cfg.search.n_trials, False
    while finished(study) < n_trials and (deadline is None or time.monotonic() < deadline):
        recover_dead_local_trials(study)  # before the trial, so this worker takes the retried one
        # Looked at before asking: a trial asked for with every place taken can only end FAILED
        # (SurplusTrial), one more failed trial in the study each time a worker finished before the
        # others. Only two workers asking for the last place at once still make one.
        if not has_room(study, n_trials):
            if not waiting:
                print(f"sweep: no trial left to start; waiting for other workers' trials ({finished(study)}/{n_trials} done)", flush=True)
            waiting = True
            threads.rest()  # its threads go to the trials still training
            wait_for_others(study)
            continue
        waiting = False
        threads.resume()
        study.optimize(objective, n_trials=1, catch=(NonFiniteLoss, SurplusTrial), callbacks=callbacks)


def _promote_best(cfg: ExperimentConfig, study: optuna.Study, run_id: str, url: str, data: StudentData) -> SweepResult:
    """Register the best trial (chosen on validation) and move the champion if it is better; then,
    with ``search.plain_baseline``, train its plain twin and log the distillation gain."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    done = finished(study)
    if not complete:
        tracking.set_tags({"champion.promoted": "false"})
        return SweepResult(study.study_name, url, run_id, done, None, None, {}, None, None, False, None)
    best = study.best_trial
    evaluated, best_run = best.user_attrs[EVAL_ATTR], best.user_attrs[RUN_ATTR]
    settings = {STUDY_TAG: study.study_name, TRIAL_TAG: best.number, **best.params}
    version, promoted = registry.register_and_promote(
        best.user_attrs[MODEL_ATTR],
        registry.student_model_name(cfg),
        best.value,
        run_id=best_run,
        **registry.notes(f"Best trial ({best.number}) of the sweep {study.study_name!r}", best.value, evaluated, settings),
    )
    plain = None
    if cfg.search.plain_baseline:
        plain = baseline.measure(cfg, data, study.study_name, best)
        print(f"sweep: {baseline.describe(evaluated, plain)}", flush=True)
    return SweepResult(study.study_name, url, run_id, done, best.value, evaluated, best.params, best_run, version, promoted, plain)
