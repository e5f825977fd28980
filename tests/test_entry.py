"""The entry module: help, --print-config, short names, exit statuses, and `mlflow run` without --experiment-name."""

from __future__ import annotations

import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from kdlib import __main__ as entry
from kdlib import registry
from kdlib.configure import build_config, settings
from kdlib.teacher import run_teacher
from tests.conftest import ROOT, SMOKE, all_runs, mlflow_run, printed_run_id, stopped_by_sigterm


def test_help_lists_every_setting_and_the_jobs_short_names(capsys):
    for name, job in entry.JOBS.items():
        assert entry.main([name, "--help"]) == 0
        out = capsys.readouterr().out
        for key, kind, _default, meaning in settings():
            assert f"  {key}  {kind}, default " in out and meaning in out, f"{name} --help lacks {key}"
        for short, key in entry.short_names(job).items():
            assert f"  {short} = {key}" in out
    assert "  search.n_trials  an integer, default 30: " in out


def test_print_config_shows_the_merged_config_and_touches_no_store(tmp_path, capsys):
    minilm = str(ROOT / "experiments" / "sst2-minilm.yaml")
    assert entry.main(["distill", "--experiment", minilm, "distill.train.epochs=2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["distill"]["train"] == {**printed["distill"]["train"], "learning_rate": 1e-4, "epochs": 2}
    assert printed["student"]["name_or_path"] == "bert-base-uncased"  # the student's own default
    assert printed["student"]["teacher_layers"] == [0, 2, 4] and printed["train"]["epochs"] == 2  # from the YAML
    assert not (tmp_path / "mlflow.db").exists()
    # The printed YAML is an experiment file that builds the same config.
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert build_config(again) == build_config(minilm, {"distill.train.epochs": "2"})


def test_short_names_reach_their_keys(capsys):
    assert entry.main(["sweep", "--experiment", str(SMOKE), "n_trials=7", "--top_k", "2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["search"]["n_trials"] == 7 and printed["report"]["top_k"] == 2
    # Short names belong to their jobs: evaluate's model_uri is not export's.
    assert entry.main(["export", "--experiment", str(SMOKE), "model_uri=runs:/x/model", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["export"]["model_uri"] == "runs:/x/model"
    assert entry.main(["teacher", "--experiment", str(SMOKE), "n_trials=7"]) == 2
    assert "unknown key 'n_trials'" in capsys.readouterr().err


def test_no_job_and_ctrl_c_give_one_line(monkeypatch, capsys):
    assert entry.main([]) == 2
    assert capsys.readouterr().err.strip().endswith("error: name a job; `python -m kdlib --help` lists them")

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setitem(entry.JOBS, "teacher", entry.Job(interrupted, "interrupted"))
    assert entry.main(["teacher", "--experiment", str(SMOKE)]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"


def _model_versions(client: MlflowClient) -> set[tuple[str, str, tuple[str, ...]]]:
    return {
        (v.name, v.version, tuple(sorted(v.aliases)))
        for m in client.search_registered_models()
        for v in client.search_model_versions(f"name='{m.name}'")
    }


@pytest.mark.parametrize("job, epochs", [("teacher", "train.epochs"), ("distill", "distill.train.epochs")])
def test_a_job_stopped_by_sigterm_mid_training_fails_its_run_and_registers_nothing(tmp_path, job, epochs):
    """``kill`` or a scheduler's stop (SIGTERM) unwinds a job as Ctrl-C does: exit 130 with the resume
    line, its MLflow run FAILED rather than left RUNNING, the registry as it was."""
    if job == "distill":
        run_teacher(build_config(SMOKE, {"train.epochs": "1", "data.max_eval_examples": "200"}))
    client = MlflowClient()
    registered = _model_versions(client)
    command = [sys.executable, "-m", "kdlib", job, "--experiment", str(SMOKE), "data.max_eval_examples=200", f"{epochs}=500"]

    def a_run_training():  # RUNNING, with an epoch's validation accuracy logged
        running = [r for r in all_runs("attributes.status = 'RUNNING'") if registry.METRIC in r.data.metrics]
        return running[0] if running else None

    returncode, err, stopped = stopped_by_sigterm(command, tmp_path, a_run_training, 300, f"the {job} job's first epoch")
    assert returncode == 130, err[-3000:]
    assert "interrupted; rerun the same command to resume" in err
    assert client.get_run(stopped.info.run_id).info.status == "FAILED"
    assert not all_runs("attributes.status = 'RUNNING'")
    assert _model_versions(client) == registered


def test_mlflow_run_without_experiment_name_prints_the_run_that_holds_the_results(tmp_path):
    done = mlflow_run(tmp_path, "teacher", "train.epochs=1", "data.max_eval_examples=100", experiment_name=None)
    assert done.returncode == 0, done.stderr[-3000:]
    run = MlflowClient().get_run(printed_run_id(done))
    assert run.data.tags["kd.experiment"] == "smoke" and run.data.tags["kd.role"] == "teacher"
    assert "val_accuracy" in run.data.metrics and run.data.tags["kd.teacher_logits"]
    version = MlflowClient().get_model_version_by_alias("smoke-teacher", "champion")
    assert version.run_id == run.info.run_id


def test_bad_split_and_transfer_settings_stop_with_one_line_before_any_run(capsys):
    """Each refusal: exit status 2, one line naming the key and what was expected, nothing logged or registered."""
    cases = [
        (["distill.transfer.copies=-1"], "distill.transfer.copies = -1 is out of range; expected an integer >= 0"),
        (["distill.transfer.p_replace=1.2"], "distill.transfer.p_replace = 1.2 is out of range; expected a probability in [0, 1]"),
        (["data.validation_size=0"], "data.validation_size = 0.0 is out of range"),
        (["data.validation_size=5000"], "data.validation_size = 5000 leaves no training sentences; expected fewer than the 3000 sentences"),
        (["data.validation_split=holdout"], "data.validation_split = 'holdout' cannot be read: data: builtin:sentiment has no split 'holdout'"),
    ]
    for overrides, message in cases:
        assert entry.main(["teacher", "--experiment", str(SMOKE), *overrides]) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    client = MlflowClient()
    assert client.search_experiments(filter_string="name = 'smoke'") == []
    assert client.search_registered_models() == []
