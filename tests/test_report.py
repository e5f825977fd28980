"""The sweep report: real values in its figures, table and CSV; renders offline in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from kdlib.errors import KDError
from reports.report import ERROR_HOOK, ModelRow, build_report, epoch_curves, pareto
from tests.conftest import in_store, mlflow_run, swept_config, unavailable

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


def study_of(store: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(store / "mlflow.optuna-journal.log")))
    return optuna.load_study(study_name="smoke-sweep", storage=storage)


@pytest.fixture(scope="module")
def report(swept_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with in_store(swept_store):
        return build_report(swept_config(f"report.output_dir={out}", "report.latency_calls=5"))


def render(page: Path) -> str:
    """The DOM after the page's scripts ran, from headless Chromium without network access."""
    if CHROMIUM is None:
        unavailable("Chromium is not installed (.ci/run installs Debian's chromium)")
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_figures_table_and_csv_hold_the_trials(in_swept, report):
    study = study_of(in_swept)
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    assert report.study_name == "smoke-sweep" and report.sweep_run_id == study.user_attrs["mlflow_sweep_run_id"]

    history = report.figures["history"].data[0]
    assert list(history.y) == pytest.approx([t.value for t in complete])
    # Optuna draws one line per finished trial; its hover data hold the real (3-digit) values.
    lines = [dict(map(tuple, trace.customdata)) for trace in report.figures["parallel"].data if trace.customdata is not None]
    assert sorted((line["Objective Value"], line["distill.alpha"]) for line in lines) == sorted(
        (f"{t.value:.3g}", f"{t.params['distill.alpha']:.3g}") for t in complete
    )
    contour = report.figures["contour"]
    assert {contour.layout.xaxis.title.text, contour.layout.yaxis.title.text} == {"distill.alpha", "distill.temperature"}
    assert {"importances", "curves"} <= set(report.figures)

    table = report.table.set_index("model")
    client = MlflowClient()
    teacher = client.get_model_version_by_alias("smoke-teacher", "champion")
    assert table.loc["teacher", "val_accuracy"] == round(client.get_run(teacher.run_id).data.metrics["val_accuracy"], 4)
    assert "plain student" in table.index
    best = sorted(complete, key=lambda t: t.value, reverse=True)
    for trial in best:
        row = table.loc[f"trial {trial.number}"]
        assert row["val_accuracy"] == round(trial.value, 4) and row["model_uri"] == trial.user_attrs["model_uri"]
        assert row["eval_accuracy"] == round(trial.user_attrs["eval_accuracy"], 4)
        assert row["val_eval_gap"] == pytest.approx(row["val_accuracy"] - row["eval_accuracy"], abs=2e-4)
    # The gain panel: teacher, plain student and best trial on both splits, and the gain the sweep logged.
    gain = report.figures["gain"]
    assert [trace.name.split()[0] for trace in gain.data] == ["validation", "evaluation"]
    assert list(gain.data[0].x) == ["teacher", "plain student", f"trial {best[0].number}"]
    assert list(gain.data[1].y) == [table.loc[m, "eval_accuracy"] for m in gain.data[1].x]
    page = report.html.read_text(encoding="utf-8")
    assert "Distillation gain on the evaluation split" in page and "McNemar" in page
    assert table["latency_batch1_p50_ms"].gt(0).all() and table["pareto_front"].any()

    csv = pd.read_csv(report.csv)
    assert list(csv["number"]) == [t.number for t in study.trials]
    assert csv.loc[csv["state"] == "COMPLETE", "val_accuracy"].tolist() == pytest.approx([t.value for t in complete])

    page = report.html.read_text()
    assert len(re.findall(r"plotly\.js v\d+\.\d+\.\d+", page)) == 1  # the library is embedded, once
    assert not re.search(r"<script[^>]+src=", page) and f"<td>trial {best[0].number}</td>" in page
    logged = {a.path for a in client.list_artifacts(report.sweep_run_id, "report")}
    assert logged == {"report/smoke-sweep.html", "report/smoke-sweep.csv"}


def test_report_renders_in_headless_chromium_without_script_errors(report):
    dom = render(report.html)
    assert re.search(r'<ul id="kd-errors" hidden="">\s*</ul>', dom), re.findall(r'<li class="kd-error">([^<]*)', dom)
    rendered = re.findall(r'<div id="fig-(\w+)" class="plotly-graph-div js-plotly-plot"', dom)
    assert sorted(rendered) == sorted(report.figures)
    assert dom.count('class="main-svg"') >= len(report.figures)


def test_a_script_error_shows_in_the_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(f"<html><head>{ERROR_HOOK}</head><body><ul id='kd-errors' hidden></ul><script>noSuchFunction()</script></body></html>")
    assert "noSuchFunction is not defined" in render(page)


def test_epoch_curves_mark_pruned_trials():
    study = optuna.create_study(direction="maximize")
    dist = {"distill.alpha": FloatDistribution(0, 1)}
    study.add_trial(create_trial(value=0.8, params={"distill.alpha": 0.5}, distributions=dist, intermediate_values={1: 0.7, 2: 0.8}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"distill.alpha": 0.9}, distributions=dist, intermediate_values={1: 0.6}))
    fig = epoch_curves(study, k=3)
    finished, pruned = fig.data
    assert finished.name == "trial 0" and list(finished.y) == [0.7, 0.8]
    assert pruned.name == "trial 1 (pruned)" and pruned.line.dash == "dash" and list(pruned.marker.symbol) == ["x"]


def test_pareto_front():
    rows = [
        ModelRow("teacher", "", "", 0.90, 0.80, 10, 1.0, 8.0),
        ModelRow("a", "", "", 0.85, 0.70, 5, 1.0, 2.0),
        ModelRow("b", "", "", 0.84, 0.99, 5, 1.0, 3.0),  # slower and less accurate on validation than a (evaluation never decides)
        ModelRow("c", "", "", 0.80, 0.60, 5, 1.0, 1.0),
        ModelRow("untimed", "", "", 0.99, 0.99, 5, 1.0, None),
    ]
    assert pareto(rows) == {"teacher", "a", "c"}


def test_report_before_any_sweep_says_what_to_run(tmp_path):
    with pytest.raises(KDError, match="report: no sweep has run here: the study storage .*optuna-journal.log' does not exist"):
        build_report(swept_config())
    assert not (tmp_path / "mlflow.optuna-journal.log").exists() and not (tmp_path / "reports").exists()


def test_report_of_another_study_names_the_studies_there(in_swept):
    with pytest.raises(KDError, match=r"report: no study 'nope' in .*optuna-journal.log \(studies there: smoke-sweep\); pass the experiment file"):
        build_report(swept_config("search.study_name=nope"))


@pytest.mark.e2e
def test_mlflow_run_report_as_documented(in_swept, tmp_path):
    done = mlflow_run(in_swept, "report", f"output_dir={tmp_path}", "data.max_eval_examples=200", "report.latency_calls=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "smoke-sweep.html").is_file() and (tmp_path / "smoke-sweep.csv").is_file()


def test_an_unwritable_output_dir_is_named_before_any_work(in_swept, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(KDError, match=r"report.output_dir = '.*a-file/out' is not a writable folder"):
        build_report(swept_config(f"report.output_dir={blocker / 'out'}"))
