"""Distill and sweep on the smoke experiment: tracking, pruning, resume, NaN trials, champion gating."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from kdlib import student as student_module
from kdlib.__main__ import JOBS, short_names
from kdlib.configure import build_config, parse_overrides, replace
from kdlib.distill import run_distill
from kdlib.errors import KDError
from kdlib.teacher import run_teacher
from search import space, sweep
from search.benchmarks.bench import trial_throughput
from search.study import STARTUP_TRIALS, WORKER_ATTR, TrialDraws, default_storage, make_storage, open_study, recover_dead_local_trials, trial_runs
from search.sweep import run_sweep
from tests.conftest import SMOKE, in_store, mlflow_run

BASE = ["data.max_eval_examples=200", "train.epochs=3"]


def config(*overrides: str):
    raw = parse_overrides([*BASE, *overrides])
    short = short_names(JOBS["sweep"])
    return build_config(SMOKE, {short.get(k, k): v for k, v in raw.items()})


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory):
    """One smoke teacher per module; each test gets its own copy of the store (artifacts are shared, read-only)."""
    folder = tmp_path_factory.mktemp("teacher")
    with in_store(folder):
        run_teacher(config())
    return folder / "mlflow.db"


@pytest.fixture
def with_teacher(teacher_store, tmp_path):
    shutil.copy(teacher_store, tmp_path / "mlflow.db")


def trials(study_name: str, storage: str | None = None):
    store, _ = make_storage(storage or default_storage())
    return optuna.load_study(study_name=study_name, storage=store).get_trials()


def children(parent_id: str):
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and tags.`kd.role` = 'student-trial'"
    )
    return sorted(runs, key=lambda r: int(r.data.tags["optuna.trial"]))


def test_search_space_validation():
    with pytest.raises(KDError, match="search.space.train.learning_rate is not a student setting"):
        space.validate(config("search.space.train.learning_rate.low=1e-5", "search.space.train.learning_rate.high=1e-4"))
    with pytest.raises(KDError, match=r"alpha = 2.0 is out of range; expected a number in \[0, 1\]"):
        space.validate(config("search.space.distill.alpha.high=2"))
    params = space.suggest(
        optuna.trial.FixedTrial({"distill.temperature": 2.0, "distill.alpha": 0.5, "distill.train.learning_rate": 1e-4, "distill.train.epochs": 2}),
        config(),
    )
    assert params["distill.train.epochs"] == 2 and isinstance(params["distill.train.epochs"], int)


def test_the_first_trial_takes_the_configured_values_that_lie_inside_their_ranges():
    cfg = config(
        "distill.temperature=30",  # outside 1..20: sampled
        "search.space.distill.train.epochs.high=2",  # the smoke student's 3 epochs, outside: sampled
    )
    cfg = replace(cfg, {"search.space.distill.alpha": {"choices": ["0.25", "0.50"]}})
    assert space.configured(cfg) == {"distill.alpha": "0.50", "distill.train.learning_rate": 1e-3}
    assert space.configured(replace(config(), {"search.space.distill.alpha": {"choices": ["0.25", "0.75"]}})) == {
        "distill.temperature": 4.0,
        "distill.train.learning_rate": 1e-3,
        "distill.train.epochs": 3,
    }


def test_distill_needs_a_teacher_and_matching_logits(with_teacher, tmp_path):
    result, version, promoted = run_distill(config("distill.train.epochs=2"))
    assert promoted and version == "1"
    run = MlflowClient().get_run(result.run_id)
    for metric in ("val_accuracy", "val_loss", "train_kd_loss", "train_ce_loss", "val_agreement", "train_examples_per_s"):
        assert len(MlflowClient().get_metric_history(result.run_id, metric)) == 2, metric
    assert run.data.params["distill.temperature"] == "4.0"
    # auto, resolved: the smoke student is cut from its teacher, so it starts from a trained table (lazy on a CPU)
    assert run.data.params["distill.train.word_embedding_updates"] == ("dense" if torch.cuda.is_available() else "lazy")
    with pytest.raises(KDError, match="was made for other inputs .*train_fingerprint"):
        run_distill(config("data.max_train_examples=1000"))
    with pytest.raises(KDError, match="no registered model 'other-teacher' with alias 'champion'.*run the teacher entry point first"):
        run_distill(config("name=other"))


def test_sweep_tracks_every_trial_prunes_and_registers_the_best(with_teacher):
    cfg = config("n_trials=6", "search.space.distill.train.epochs.low=3", "search.space.distill.train.learning_rate.low=1e-6")
    result = run_sweep(cfg)
    assert result.finished == 6
    states = [t.state for t in trials("smoke-sweep")]
    assert states.count(TrialState.PRUNED) >= 1 and states.count(TrialState.COMPLETE) >= 2

    runs = children(result.run_id)
    assert len(runs) == 6
    client = MlflowClient()
    for run, trial in zip(runs, trials("smoke-sweep"), strict=True):
        assert run.info.status == "FINISHED"
        assert float(run.data.params["distill.alpha"]) == pytest.approx(trial.params["distill.alpha"])
        epochs = len(client.get_metric_history(run.info.run_id, "val_accuracy"))
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list"
        )
        if trial.state == TrialState.PRUNED:
            assert run.data.tags["optuna.pruned"] == "true"
            # It trained no epoch past the one it was pruned after, which is never its last.
            assert epochs == len(trial.intermediate_values) < trial.params["distill.train.epochs"]
            assert models == []  # a pruned trial leaves no half-made model
        else:
            assert epochs == trial.params["distill.train.epochs"]
            (model,) = models  # its model, with every epoch's metrics linked to it
            assert model.status.name == "READY" and sorted(m.step for m in model.metrics if m.key == "val_accuracy") == list(range(1, epochs + 1))

    best = max((t for t in trials("smoke-sweep") if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert result.best_value == best.value
    parent = client.get_run(result.run_id)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.value)
    champion = client.get_model_version_by_alias("smoke-student", "champion")
    assert champion.run_id == best.user_attrs["mlflow_run_id"]
    assert parent.data.tags["champion.promoted"] == "true"

    predictions = mlflow.pyfunc.load_model("models:/smoke-student@champion").predict(["a gorgeous, witty film", "a tedious mess"])
    assert list(predictions.columns) == ["label", "score", "prob_negative", "prob_positive"]
    assert np.allclose(predictions[["prob_negative", "prob_positive"]].sum(axis=1), 1.0)


def test_a_trial_is_never_pruned_after_its_last_epoch(with_teacher, monkeypatch):
    """Pruning saves the epochs still to come; after the last one it would only discard a trained student."""
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    for epochs, state, trained in ((1, TrialState.COMPLETE, 1), (2, TrialState.PRUNED, 1)):
        bounds = [f"search.space.distill.train.epochs.low={epochs}", f"search.space.distill.train.epochs.high={epochs}"]
        run_sweep(config("n_trials=1", f"study_name=epochs-{epochs}", *bounds))
        (trial,) = trials(f"epochs-{epochs}")
        assert (trial.state, len(trial.intermediate_values)) == (state, trained)


def test_rerun_resumes_and_runs_only_missing_trials(with_teacher):
    first = run_sweep(config("n_trials=2"))
    second = run_sweep(config("n_trials=3"))
    third = run_sweep(config("n_trials=3"))
    numbers = [t.number for t in trials("smoke-sweep")]
    assert numbers == [0, 1, 2]
    # The new study's first trial ran the experiment's own settings; resuming did not queue them again.
    assert [t.params == space.configured(config()) for t in trials("smoke-sweep")] == [True, False, False]
    assert run_sweep(config("n_trials=1", "search.start_from_config=false", "study_name=sampled")).finished == 1
    assert trials("sampled")[0].params != space.configured(config())
    assert first.finished == 2 and second.finished == 3 and third.finished == 3
    assert len(children(first.run_id)) == 2 and len(children(second.run_id)) == 1 and children(third.run_id) == []
    client = MlflowClient()
    # Resumed workers nest under the sweep's first run: one tree in `mlflow ui`.
    assert client.get_run(second.run_id).data.tags["mlflow.parentRunId"] == first.run_id


def test_nan_trial_fails_cleanly_and_the_sweep_goes_on(with_teacher, monkeypatch):
    real = student_module.kd_loss

    def nan_when_alpha_high(student_logits, teacher_logits, labels, temperature, alpha):
        loss, kl, ce = real(student_logits, teacher_logits, labels, temperature, alpha)
        return (loss * math.nan if alpha > 0.6 else loss), kl, ce

    monkeypatch.setattr(student_module, "kd_loss", nan_when_alpha_high)
    result = run_sweep(config("n_trials=3", "pruner=none"))
    done = trials("smoke-sweep")
    failed = [t for t in done if t.state == TrialState.FAIL]
    assert failed, "seed 0 samples alpha > 0.6 within the first trials"
    assert all(t.params["distill.alpha"] > 0.6 for t in failed)
    assert result.finished == 3 == sum(t.state == TrialState.COMPLETE for t in done)
    client = MlflowClient()
    for t in failed:
        assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "FAILED"


def test_worse_sweep_leaves_the_student_champion(with_teacher):
    good = run_sweep(config("n_trials=2", "study_name=good"))
    worse = run_sweep(
        config(
            "n_trials=1",
            "study_name=worse",
            "search.space.distill.train.learning_rate.low=1e-7",
            "search.space.distill.train.learning_rate.high=2e-7",
            "search.space.distill.train.epochs.high=1",
        )
    )
    assert worse.best_value < good.best_value and not worse.promoted
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("smoke-student", "champion").version) == good.version
    tags = client.get_run(worse.run_id).data.tags
    assert tags["champion.promoted"] == "false" and tags["champion.previous_version"] == good.version


@pytest.mark.e2e
def test_mlflow_run_main_runs_teacher_then_sweep(tmp_path):
    out = tmp_path / "reports"
    done = mlflow_run(tmp_path, "main", "n_trials=2", "data.max_eval_examples=200", "train.epochs=2", f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mlflow ui" in done.stdout and "models:/smoke-student@champion" in done.stdout
    assert f"report: {out / 'smoke-sweep.html'}" in done.stdout  # every sweep ends with its report
    client = MlflowClient()
    assert client.get_model_version_by_alias("smoke-teacher", "champion")
    student = client.get_model_version_by_alias("smoke-student", "champion")
    sweep_run = client.get_run(client.get_run(student.run_id).data.tags["mlflow.parentRunId"])
    assert sweep_run.data.params["search.n_trials"] == "2"  # -P n_trials reached search.n_trials
    assert len(trials("smoke-sweep")) == 2
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id, "report")} == {"report/smoke-sweep.html", "report/smoke-sweep.csv"}
    # A second `main` finds the champion teacher and goes straight to the (already finished) sweep.
    again = mlflow_run(tmp_path, "main", "n_trials=2", "data.max_eval_examples=200", "train.epochs=2", f"output_dir={out}")
    assert again.returncode == 0 and "teacher:" not in again.stdout
    assert len(client.search_model_versions("name = 'smoke-teacher'")) == 1


def test_a_study_belongs_to_one_mlflow_store(tmp_path, monkeypatch):
    from search.study import check_store, safe_url

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a.db'}")
    journal_a = default_storage()
    study = optuna.create_study(study_name="s", storage=make_storage(journal_a)[0])
    check_store(study)
    check_store(study)  # a resume against the same store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'b.db'}")
    assert default_storage() != journal_a  # two stores in one folder get two journals
    with pytest.raises(KDError, match=r"study 's' belongs to the MLflow store sqlite:///.*a.db, not sqlite:///.*b.db"):
        check_store(optuna.load_study(study_name="s", storage=make_storage(journal_a)[0]))
    assert safe_url("postgresql+psycopg2://kd:s3cret@db:5432/optuna") == "postgresql+psycopg2://kd:***@db:5432/optuna"


BERT_BASE = 110_000_000  # parameters of a bert-base student


@pytest.mark.parametrize(
    ("requested", "cuda", "threads", "left", "expected"),
    [
        (None, False, 2, 30, (2, 1, "auto")),
        (None, False, 8, 2, (2, 4, "auto")),
        (None, False, 8, 1, (1, 8, "auto")),  # a last trial: a second process would only wait
        (None, False, 1, 30, (1, 1, "auto")),
        (None, True, 16, 30, (8, 2, "auto")),  # the GPU's share: at most 8, 2 threads each
        (None, True, 8, 30, (4, 2, "auto")),
        (None, True, 16, 3, (3, 5, "auto")),
        (None, True, 16, 1, (1, 16, "auto")),
        (None, True, 1, 30, (1, 1, "auto")),
        (3, False, 8, 30, (3, 2, "as configured")),
        (4, False, 2, 1, (4, 1, "as configured")),
        (2, True, 16, 30, (2, 8, "as configured")),
    ],
)
def test_workers_null_picks_two_on_a_cpu_with_two_threads_and_several_on_a_gpu(monkeypatch, requested, cuda, threads, left, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (139 * 2**30, 141 * 2**30))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    workers = sweep.local_workers(requested, left, BERT_BASE)
    assert (workers.count, workers.threads, workers.reason.split(":")[0]) == expected


@pytest.mark.parametrize(
    ("parameters", "free_gib", "count"),
    [(BERT_BASE, 139, 8), (BERT_BASE, 17, 4), (BERT_BASE, 9, 2), (BERT_BASE, 3, 1), (17_400_000, 9, 3), (335_000_000, 24, 3)],
)
def test_workers_null_on_a_gpu_start_no_more_trials_than_its_free_memory_holds(monkeypatch, parameters, free_gib, count):
    """Each trial's share: its student's weights, gradients and AdamW moments, and fixed headroom."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free_gib * 2**30, 141 * 2**30))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    workers = sweep.local_workers(None, 30, parameters)
    assert workers.count == count
    assert f"{free_gib} GiB free" in workers.reason


def test_two_local_workers_by_default_share_the_study_and_register_once(with_teacher, monkeypatch, capsys):
    """``search.workers: null`` (the default; smoke pins 1) on a CPU with 2 threads: two one-thread processes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the host's count must not decide what this test sees
    try:
        # Trials of 3 epochs, so the second process (which first loads PyTorch and the data) finds some left.
        result = run_sweep(config("n_trials=8", "search.workers=null", "pruner=none", "search.space.distill.train.epochs.low=3"))
        assert torch.get_num_threads() == 2  # given back after the sweep
    finally:
        torch.set_num_threads(threads)
    assert "sweep: workers 2 x threads 1 (auto: 2 CPU threads;" in capsys.readouterr().out
    done = [t for t in trials("smoke-sweep") if t.state == TrialState.COMPLETE]
    assert result.finished == 8 and len(done) == 8
    assert len({t.user_attrs["worker"] for t in done}) == 2, "both processes ran trials"
    # Whichever process ran it, each sampled trial tried the settings one process would have drawn for its number.
    cfg = config("n_trials=8", "search.space.distill.train.epochs.low=3")
    alone = optuna.create_study(sampler=TrialDraws(cfg.search.seed, seed=12345))
    drawn = [space.suggest(alone.ask(), cfg) for _ in range(8)]
    assert [t.params for t in sorted(done, key=lambda t: t.number)][1:] == drawn[1:]  # trial 0: the configured settings
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(r.info.status == "FINISHED" for r in runs)
    sweeps = [r for r in runs if r.data.tags.get("kd.role") == "sweep"]
    assert len(sweeps) == 2 and sum("mlflow.parentRunId" not in r.data.tags for r in sweeps) == 1  # one tree
    for run in sweeps:
        params = run.data.params
        assert (params["search.workers"], params["search.local_workers"], params["search.threads_per_worker"]) == ("None", "2", "1")
    assert {r.data.params["search.seed"] for r in sweeps} == {"0", str(sweep.worker_seed(0, 1))}
    (version,) = client.search_model_versions("name = 'smoke-student'")
    assert version.run_id == max(done, key=lambda t: t.value).user_attrs["mlflow_run_id"]
    # Every trial's run is found from the study, not only the launcher's, and the bench counts each one's epochs.
    found = trial_runs("smoke", "smoke-sweep")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in found) == sorted(t.number for t in done)
    assert {r.data.tags["mlflow.parentRunId"] for r in found} == {r.info.run_id for r in sweeps}
    examples, seconds, _ = trial_throughput("smoke", "smoke-sweep")
    assert examples == pytest.approx(sum(3 * int(r.data.params["n_train"]) for r in found), rel=1e-6) and seconds > 0


def test_the_first_trials_draw_by_their_number_whichever_worker_asks_then_tpe_takes_over():
    def ask(study: optuna.Study) -> dict:
        trial = study.ask()
        return {"t": trial.suggest_float("t", 1, 20, log=True), "e": trial.suggest_int("e", 1, 5), "c": trial.suggest_categorical("c", ["a", "b"])}

    alone = optuna.create_study(sampler=TrialDraws(3, seed=0))
    one = [ask(alone) for _ in range(STARTUP_TRIALS)]
    # Two workers with their own seeds on one storage, asking in turns.
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", sampler=TrialDraws(3, seed=1))
    second = optuna.load_study(storage=storage, study_name="s", sampler=TrialDraws(3, seed=2))
    shared = [ask(study) for study in [first, second] * (STARTUP_TRIALS // 2)]
    assert shared == one and len({tuple(p.items()) for p in one}) == STARTUP_TRIALS
    assert [ask(optuna.create_study(sampler=TrialDraws(4, seed=0))) for _ in range(1)] != one[:1]  # another draw seed, other draws
    # After them, TPE: seeded by the worker, it models the trials told so far.
    for trial in first.trials:
        first.tell(trial.number, trial.params["t"])
    proposals = {ask(optuna.load_study(storage=storage, study_name="s", sampler=TrialDraws(3, seed=seed)))["t"] for seed in (1, 2)}
    assert len(proposals) == 2


def test_a_study_draws_its_first_trials_from_its_creators_seed(tmp_path):
    storage = make_storage(str(tmp_path / "journal.log"))[0]
    study, created = open_study(config("seed=3"), storage)
    again, created_again = open_study(config("seed=8"), storage)  # another machine's worker
    assert (created, created_again) == (True, False)
    assert study.sampler.draw_seed == again.sampler.draw_seed == 3


def test_local_workers_never_take_the_seed_of_another_machines_sweep():
    """Machines seeded 0..9, each with 4 local workers: 40 sampler seeds, all different."""
    seeds = [seed if index == 0 else sweep.worker_seed(seed, index) for seed in range(10) for index in range(4)]
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2**31


def test_a_worker_with_no_place_left_waits_for_the_running_trial_and_takes_its_retry(with_teacher, monkeypatch, capsys):
    """A worker that finds the study full must not end the sweep (and register the best as it stands)
    while another worker's trial runs: that trial may still beat it. Here that trial's worker dies: its
    trial is failed and retried, as the RDB heartbeat does, and the waiting worker takes the retry."""
    study = optuna.create_study(study_name="smoke-sweep", storage=make_storage(default_storage())[0], direction="maximize")
    other = study.ask()  # another worker's trial, holding the only place
    seen_running = []

    def look(study):
        seen_running.append([t.number for t in study.get_trials(states=(TrialState.RUNNING,))])
        study._storage.set_trial_state_values(other._trial_id, TrialState.FAIL)  # its worker's heartbeat stopped
        RetryFailedTrialCallback(max_retry=1)(study, study._storage.get_trial(other._trial_id))

    monkeypatch.setattr(sweep, "wait_for_others", look)
    result = run_sweep(config("n_trials=1", "pruner=none"))
    assert seen_running == [[other.number]]  # it waited once, while the other trial ran
    assert "sweep: no trial left to start; waiting for other workers' trials (0/1 done)" in capsys.readouterr().out
    (done,) = [t for t in trials("smoke-sweep") if t.state == TrialState.COMPLETE]
    assert RetryFailedTrialCallback.retried_trial_number(done) == other.number
    # It asked for no trial while the study was full: the one failed trial is the dead worker's.
    assert [t.number for t in trials("smoke-sweep") if t.state == TrialState.FAIL] == [other.number]
    assert result.finished == 1 and result.version is not None


def test_a_retry_taken_by_a_live_worker_is_not_failed_for_its_dead_predecessor(tmp_path):
    """The retry of a dead worker's trial must not carry that worker's id: the live worker that takes it
    would otherwise be failed by another worker's look for dead local processes before it records itself."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    study = optuna.create_study(storage=make_storage(str(tmp_path / "journal.log"))[0], direction="maximize")
    dead = study.ask()
    dead.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{gone.stdout.strip()}")
    assert recover_dead_local_trials(study) == [dead.number]
    taken = study.ask()  # a live worker takes the retry and has not recorded itself yet
    assert recover_dead_local_trials(study) == []
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    assert running.number == taken.number and RetryFailedTrialCallback.retried_trial_number(running) == dead.number
    assert running.user_attrs == {}


def test_the_sweep_ends_with_its_plain_student_and_the_distillation_gain(in_swept):
    """Trials chosen on validation, scored on evaluation; the best one's plain twin; the gain, recomputed here."""
    from kdlib.data import load_splits
    from kdlib.metrics import paired_gain
    from tests.conftest import swept_config

    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    (sweep,) = client.search_runs(ids, "tags.`kd.role` = 'sweep' and tags.`plain_student.run_id` != ''")
    (plain,) = client.search_runs(ids, "tags.`kd.role` = 'plain-student'")
    assert plain.data.tags["mlflow.parentRunId"] == sweep.info.run_id
    best_trial = sweep.data.tags["distillation_gain.trial"]
    (best,) = client.search_runs(ids, f"tags.`kd.role` = 'student-trial' and tags.`optuna.trial` = '{best_trial}'")
    # The plain twin: distillation taken out, every other setting the best trial's.
    assert float(plain.data.params["distill.alpha"]) == 0.0 and plain.data.params["distill.transfer.copies"] == "0"
    assert best.data.params["distill.transfer.copies"] == "1" and "transfer.digest" in best.data.params
    assert "transfer.digest" not in plain.data.params
    for key in ("distill.temperature", "distill.train.learning_rate", "distill.train.epochs"):
        assert plain.data.params[key] == best.data.params[key], key
    # Each finished student: validation per epoch, evaluation once, the gap between them.
    for run in (best, plain):
        metrics = run.data.metrics
        assert metrics["val_eval_gap"] == pytest.approx(metrics["val_accuracy"] - metrics["eval_accuracy"])
        assert len(client.get_metric_history(run.info.run_id, "eval_accuracy")) == 1
    gain = paired_gain(
        np.load(mlflow.artifacts.download_artifacts(run_id=best.info.run_id, artifact_path="predictions/eval_logits.npy")),
        np.load(mlflow.artifacts.download_artifacts(run_id=plain.info.run_id, artifact_path="predictions/eval_logits.npy")),
        load_splits(swept_config().data).eval.labels,
    )
    metrics = sweep.data.metrics
    assert metrics["distillation_gain"] == pytest.approx(best.data.metrics["eval_accuracy"] - plain.data.metrics["eval_accuracy"])
    assert metrics["distillation_gain"] == pytest.approx(gain.difference)
    assert metrics["distillation_gain_low"] <= metrics["distillation_gain"] <= metrics["distillation_gain_high"]
    assert metrics["distillation_gain_p_value"] == pytest.approx(gain.p_value)
    assert metrics["plain_eval_accuracy"] == plain.data.metrics["eval_accuracy"]
    assert metrics["best_eval_accuracy"] == pytest.approx(best.data.metrics["eval_accuracy"])
    # The bench counts the set all trials shared once: its copies, no unlabelled sentences, its time.
    from search.benchmarks.bench import transfer_cost

    seconds, copies, unlabelled = transfer_cost(sweep.data.tags["kd.experiment"], sweep.data.tags["optuna.study"])
    assert (copies, unlabelled) == (int(best.data.params["transfer.copies"]), 0) and copies > 0
    assert seconds == pytest.approx(float(best.data.params["transfer.augment_seconds"]) + float(best.data.params["transfer.label_seconds"]))


def test_a_resumed_sweep_keeps_its_plain_student(with_teacher, capsys):
    first = run_sweep(config("n_trials=2", "distill.train.epochs=1", "search.space.distill.train.epochs=null"))
    again = run_sweep(config("n_trials=2", "distill.train.epochs=1", "search.space.distill.train.epochs=null"))
    assert again.baseline.run_id == first.baseline.run_id  # the best trial did not change: nothing retrained
    assert again.baseline.gain == first.baseline.gain
    assert "distillation_gain" in capsys.readouterr().out
    off = run_sweep(config("n_trials=1", "study_name=no-baseline", "search.plain_baseline=false"))
    assert off.baseline is None


def test_a_study_chosen_on_the_evaluation_split_is_not_resumed(with_teacher):
    """A study from before validation and evaluation were separate holds dev-chosen values: one line, no run."""
    store, _ = make_storage(default_storage())
    old = optuna.create_study(study_name="smoke-sweep", storage=store, direction="maximize")
    old.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.9))  # no eval_accuracy attribute
    with pytest.raises(KDError, match=r"study 'smoke-sweep' holds trials chosen on the evaluation split \(trials \[0\]"):
        run_sweep(config("n_trials=2"))
    client = MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`kd.role` = 'sweep'")
