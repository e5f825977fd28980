"""The side-by-side benchmark: this project's sweep and the Hugging Face Trainer recipe on the same settings."""

from __future__ import annotations

import json
import sys

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from kdlib import registry, tracking
from kdlib.data import load_splits
from kdlib.errors import KDError
from kdlib.metrics import accuracy
from kdlib.student import EVAL_LOGITS
from search import space
from search.benchmarks import side_by_side
from search.study import make_storage, trial_runs
from tests.conftest import SMOKE, SWEPT, all_runs, stopped_by_sigterm, swept_config

SIDE = ["search.n_trials=2", "distill.transfer.copies=0", "search.space.distill.train.epochs.high=2"]


@pytest.mark.parametrize("project_only", [{}, {"distill.transfer.copies": "1"}], ids=["like-for-like", "transfer-set-for-the-project"])
def test_both_sweeps_draw_the_same_settings_and_the_recipe_logs_each_trial(project_only, capsys):
    cfg = swept_config(*SIDE)
    given = [f"--project-only={key}={value}" for key, value in project_only.items()]
    assert side_by_side.main(["--experiment", str(SMOKE), *SWEPT, *SIDE, *given]) == 0
    results = json.loads((side_by_side.OUT / "smoke-side-by-side.json").read_text())
    assert side_by_side.markdown(results) in capsys.readouterr().out
    labels = load_splits(cfg.data).eval.labels

    ours, theirs = results["project"], results["trainer_recipe"]
    study = optuna.load_study(study_name=ours["study_name"], storage=make_storage(None)[0])
    trials = [t.params for t in sorted(study.trials, key=lambda t: t.number)]
    # One seed, one space: trial for trial the same draws, but the project's first, which ran the configured settings.
    assert trials[0] == space.configured(cfg) != theirs["sampled"]["0"]
    assert trials[1:] == [theirs["sampled"][str(number)] for number in range(1, len(trials))]
    assert results["speed_up"] == pytest.approx(theirs["wall_s"] / ours["wall_s"])
    # Best against best, sentence by sentence: the right trials' logits, in the labels' order.
    gain = results["eval_difference"]
    assert gain["difference"] == pytest.approx(ours["best_eval_accuracy"] - theirs["best_eval_accuracy"])
    assert gain["a_only"] - gain["b_only"] == round(gain["difference"] * len(labels))
    assert gain["low"] <= gain["difference"] <= gain["high"]
    assert "only the project's gets right" in side_by_side.markdown(results)
    assert ours["wall_s"] == pytest.approx(ours["sweep_s"] + ours["teacher_logits_s"] + ours["transfer_set_s"])
    # A project-only setting reaches the project's trials alone, its cost is counted, and the table names it.
    assert results["project_only"] == project_only
    assert (ours["transfer_set_s"] > 0) == bool(project_only)
    assert ("not like for like" in side_by_side.markdown(results)) == bool(project_only)
    trained = [run for run in trial_runs(cfg.name, ours["study_name"]) if registry.EVAL_METRIC in run.data.metrics]
    assert trained and all(("transfer.digest" in run.data.params) == bool(project_only) for run in trained)

    # The recipe's trials are MLflow runs under its own run, with their settings and per-epoch validation accuracy.
    runs = mlflow.search_runs(experiment_names=["smoke-trainer-recipe"], output_format="list")
    parent = [run for run in runs if run.data.tags.get(tracking.ROLE_TAG) == registry.Role.TRAINER_RECIPE]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert accuracy(tracking.load_array(parent[0].info.run_id, EVAL_LOGITS), labels) == pytest.approx(theirs["best_eval_accuracy"])
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(children) == cfg.search.n_trials
    by_temperature = {round(float(run.data.params["temperature"]), 6): run for run in children}
    for params in theirs["sampled"].values():
        run = by_temperature[round(params["distill.temperature"], 6)]
        assert float(run.data.params["alpha"]) == pytest.approx(params["distill.alpha"])
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval_accuracy")
        assert 1 <= len(history) <= params["distill.train.epochs"]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert ours["finished"] == len(complete)
    assert {number: val for number, (val, evaluated) in ours["trials"].items() if evaluated is not None} == {str(t.number): t.value for t in complete}
    assert len(theirs["trials"]) == theirs["finished"]
    # The median pruner waits for two finished trials, so both of these finish.
    assert parent[0].data.metrics[f"best_{registry.METRIC}"] == theirs["best_val_accuracy"] == max(val for val, _ in theirs["trials"].values())


@pytest.mark.parametrize(
    "override, named",
    [
        ("distill.transfer.copies=1", "distill.transfer.copies"),
        ("distill.transfer.unlabelled_split=test", "distill.transfer.unlabelled_split"),
        ("search.space.distill.train.warmup_ratio={low: 0.0, high: 0.2}", "search.space.distill.train.warmup_ratio"),
        ("student.teacher_layers=[]", "student"),
        ("distill.train.word_embeddings=frozen", "distill.train.word_embeddings = 'frozen'"),
    ],
)
def test_what_the_recipe_cannot_do_is_refused_before_anything_runs(override, named):
    with pytest.raises(KDError, match=named):
        side_by_side.compare(swept_config(*SIDE, override))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_project_only_settings_must_leave_data_teacher_and_student_shared():
    with pytest.raises(KDError, match=r"--project-only data\.max_train_examples: expected keys under distill\. or search\."):
        side_by_side.compare(swept_config(*SIDE), {"data.max_train_examples": "10"})
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_seeds_run_one_comparison_per_sampler_seed_and_summarise_them(capsys):
    cfg = swept_config(*SIDE)
    results = side_by_side.over_seeds(cfg, {}, [3, 5], vary_training_seed=True)
    printed = capsys.readouterr().out

    runs = results["runs"]
    assert [(run["search_seed"], run["training_seed"]) for run in runs] == [(3, cfg.distill.train.seed + 3), (5, cfg.distill.train.seed + 5)]
    for run in runs:
        study = optuna.load_study(study_name=run["project"]["study_name"], storage=make_storage(None)[0])
        # Each run's sampler seed reached both sides: trial for trial the same draws, but the configured first.
        trials = [t.params for t in sorted(study.trials, key=lambda t: t.number)]
        assert trials[1:] == [run["trainer_recipe"]["sampled"][str(number)] for number in range(1, len(trials))]
        # and its training seed reached both sides' trials
        assert {r.data.params["distill.train.seed"] for r in trial_runs(cfg.name, run["project"]["study_name"])} == {str(run["training_seed"])}
        recipe_trials = mlflow.search_runs(
            experiment_names=["smoke-trainer-recipe"],
            filter_string=f"tags.mlflow.parentRunId = '{run['trainer_recipe']['run_id']}'",
            output_format="list",
        )
        assert recipe_trials and {r.data.params["seed"] for r in recipe_trials} == {str(run["training_seed"])}
    assert runs[0]["trainer_recipe"]["sampled"] != runs[1]["trainer_recipe"]["sampled"]

    summary = results["summary"]
    speed_ups = [run["speed_up"] for run in runs]
    differences = [run["eval_difference"]["difference"] for run in runs]
    assert (summary["speed_up_min"], summary["speed_up_max"]) == (min(speed_ups), max(speed_ups))
    assert summary["compared"] == 2 and summary["eval_difference_mean"] == pytest.approx(sum(differences) / 2)
    assert summary["eval_difference_low"] <= summary["eval_difference_mean"] + 1e-12 <= summary["eval_difference_high"] + 2e-12
    assert json.loads((side_by_side.OUT / "smoke-side-by-side-seeds.json").read_text()) == results
    assert not (side_by_side.OUT / "smoke-side-by-side.json").exists()  # a series writes its own file alone
    # each run's own table as it ended, before the summary
    assert all(f"sampler seed {run['search_seed']}, training seed {run['training_seed']}:\n{side_by_side.markdown(run)}" in printed for run in runs)
    table = side_by_side.seeds_markdown(results)
    assert f"| 3 / {cfg.distill.train.seed + 3} |" in table and f"| 5 / {cfg.distill.train.seed + 5} |" in table and "over 2 runs" in table


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--seeds", "1", "1"], "--seeds 1 1: expected two or more different sampler seeds"),
        (["--seeds", "4"], "--seeds 4: expected two or more different sampler seeds"),
        (["--vary-training-seed"], "--vary-training-seed: expected --seeds too"),
    ],
)
def test_seeds_that_cannot_make_a_summary_are_refused_before_anything_runs(arguments, message, capsys):
    assert side_by_side.main(["--experiment", str(SMOKE), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_side_by_side_stopped_by_sigterm_in_the_recipe_ends_every_run_it_opened(tmp_path):
    """``kill`` (SIGTERM) while a recipe trial trains unwinds as Ctrl-C does: exit 130, the recipe's run
    FAILED and its trial's run (opened by the Trainer's MLflow callback) KILLED, nothing left RUNNING."""
    one_epoch = ["--project-only", "search.space.distill.train.epochs.low=1", "--project-only", "search.space.distill.train.epochs.high=1"]
    command = [
        sys.executable, "-m", "search.benchmarks.side_by_side", "--experiment", str(SMOKE), *one_epoch,
        "search.n_trials=2", "distill.transfer.copies=0", "data.max_eval_examples=200",
        "search.space.distill.train.epochs.low=500", "search.space.distill.train.epochs.high=500",
    ]  # fmt: skip

    def a_recipe_trial_training():  # RUNNING, with an epoch's validation accuracy logged by the Trainer
        runs = mlflow.search_runs(experiment_names=["smoke-trainer-recipe"], filter_string="attributes.status = 'RUNNING'", output_format="list")
        trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags and "eval_accuracy" in r.data.metrics]
        return trials[0] if trials else None

    returncode, err, trial = stopped_by_sigterm(command, tmp_path, a_recipe_trial_training, 300, "the recipe's first epoch")
    assert returncode == 130, err[-3000:]
    assert "interrupted; every MLflow run it opened has ended" in err and "outputs/bench" not in err  # a single run keeps nothing
    client = mlflow.MlflowClient()
    assert client.get_run(trial.info.run_id).info.status == "KILLED"
    recipe = client.get_run(trial.data.tags["mlflow.parentRunId"])
    assert recipe.data.tags[tracking.ROLE_TAG] == registry.Role.TRAINER_RECIPE and recipe.info.status == "FAILED"
    assert not all_runs("attributes.status = 'RUNNING'")
