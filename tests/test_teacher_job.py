"""The teacher job: end to end through `mlflow run`, and the bad inputs that must stop it cleanly."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from kdlib import teacher as teacher_job
from kdlib import tracking
from kdlib.__main__ import main
from kdlib.configure import build_config, parse_overrides
from kdlib.data import load_splits
from kdlib.errors import KDError, interrupt_on
from tests.conftest import SMOKE, all_runs, mlflow_run, printed_run_id, write_tsv

# Fewer, shorter epochs than the demo: these tests check plumbing, not accuracy.
FAST = ["train.epochs=2", "data.max_eval_examples=200"]


def assert_nothing_half_made(client: MlflowClient):
    assert all(r.info.status != "RUNNING" for r in all_runs())
    assert client.search_registered_models() == []


@pytest.mark.e2e
def test_mlflow_run_teacher_registers_caches_logits_and_predicts(tmp_path):
    # As the README runs it: the launcher's run is the job's run, and it already holds the -P params.
    done = mlflow_run(tmp_path, "teacher", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    # Not a terminal: one progress line per epoch instead of a bar.
    assert re.search(r"^teacher: epoch 2/2: \d+ steps, train_loss [\d.]+, val_accuracy [\d.]+, .*examples/s, elapsed .*, ETA", done.stdout, re.M), (
        done.stdout
    )

    client = MlflowClient()
    version = client.get_model_version_by_alias("smoke-teacher", "champion")
    run = client.get_run(version.run_id)
    assert run.info.run_id == printed_run_id(done)  # the run `mlflow run` printed holds the results
    assert client.get_experiment(run.info.experiment_id).name == "smoke"  # not "Default"
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"  # the -P override reached the job
    # What auto resolved to, logged beside it: the smoke teacher starts from scratch, so dense on any device.
    assert (run.data.params["train.word_embeddings"], run.data.params["train.word_embedding_updates"]) == ("auto", "dense")
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    # MLflow 3: the final metrics are linked to the logged model, the data splits are the run's inputs.
    model_id = version.source.removeprefix("models:/")
    assert mlflow.get_logged_model(model_id).metrics and {m.key for m in mlflow.get_logged_model(model_id).metrics} >= {"val_accuracy", "val_loss"}
    assert {(i.dataset.name, i.tags[0].value) for i in run.inputs.dataset_inputs} == {
        ("builtin:sentiment:train", "training"),
        ("builtin:sentiment:train[validation]", "validation"),
        ("builtin:sentiment:validation", "evaluation"),
    }
    assert {"train_loss", "val_loss", "train_examples_per_s"} <= set(run.data.metrics)
    assert run.data.tags["champion.promoted"] == "true"

    # The cached logits: keyed by this version and the data, one row per example, eval mode.
    artifact = run.data.tags["kd.teacher_logits"]
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifact, dst_path=str(tmp_path / "dl"))
    key = json.loads(Path(folder, "key.json").read_text())
    cfg = build_config(SMOKE, parse_overrides(FAST))
    splits = load_splits(cfg.data)
    assert key["teacher_version"] == str(version.version)
    assert key["train_fingerprint"] == splits.train.fingerprint
    assert key["validation_fingerprint"] == splits.validation.fingerprint and key["eval_fingerprint"] == splits.eval.fingerprint
    logits = np.load(f"{folder}/arrays.npz")
    assert logits["train"].shape == (len(splits.train), 2) and logits["validation"].shape == (len(splits.validation), 2)
    # Chosen on validation, scored once on evaluation, both logged, and the gap between them.
    val_accuracy = float((logits["validation"].argmax(1) == splits.validation.labels).mean())
    eval_accuracy = float((logits["eval"].argmax(1) == splits.eval.labels).mean())
    assert val_accuracy == pytest.approx(run.data.metrics["val_accuracy"], abs=1e-6)
    assert eval_accuracy == pytest.approx(run.data.metrics["eval_accuracy"], abs=1e-6)
    assert run.data.metrics["val_eval_gap"] == pytest.approx(val_accuracy - eval_accuracy, abs=1e-6)
    assert version.tags["eval_accuracy"] == f"{eval_accuracy:.4f}"

    model = mlflow.pyfunc.load_model("models:/smoke-teacher@champion")
    predictions = model.predict(["a gorgeous, witty film", "a tedious mess"])
    assert list(predictions.columns) == ["label", "score", "prob_negative", "prob_positive"]
    assert set(predictions["label"]) <= {"negative", "positive"}
    # On raw dev sentences the registered model reproduces the run's own dev logits.
    on_dev = model.predict(splits.eval.texts[:64])
    expected = np.exp(logits["eval"][:64]) / np.exp(logits["eval"][:64]).sum(1, keepdims=True)
    assert np.allclose(on_dev[["prob_negative", "prob_positive"]].to_numpy(), expected, atol=1e-4)
    assert on_dev["label"].tolist() == [["negative", "positive"][i] for i in expected.argmax(1)]
    assert np.allclose(on_dev["score"], expected.max(1), atol=1e-4)


def test_the_launcher_run_holds_the_results_in_any_experiment(monkeypatch):
    """`mlflow run` without --experiment-name opens its run in "Default" and prints its id: the job logs there."""
    launcher = MlflowClient().create_run("0").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    monkeypatch.setattr(tracking, "_launcher_used", None)
    with tracking.job_run("smoke", "teacher") as run:
        tracking.log_metrics({"val_accuracy": 0.5})
    # A second job of the same command (main: teacher, then sweep) nests under the printed run.
    with tracking.job_run("smoke", "sweep") as second:
        pass
    client = MlflowClient()
    assert run.info.run_id == launcher
    held = client.get_run(launcher)
    assert held.data.metrics["val_accuracy"] == 0.5
    assert held.data.tags["kd.experiment"] == "smoke" and held.data.tags["kd.role"] == "teacher"
    assert held.info.status == "FINISHED"
    child = client.get_run(second.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == launcher
    assert child.info.experiment_id == "0" and child.info.status == "FINISHED"
    assert [r.info.run_id for r in tracking.find_runs("smoke", "attributes.status = 'FINISHED'")] == [second.info.run_id, launcher]


@pytest.mark.parametrize(("raised", "left_open_ends"), [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_a_run_a_library_leaves_open_inside_a_job_ends_with_the_job(raised, left_open_ends):
    """The Trainer's MLflow callback opens a run per trial and ends it only at the trial's end: a job
    stopped inside such a trial ends that run and its own, neither left RUNNING."""
    with pytest.raises(raised), tracking.job_run("smoke", "trainer-recipe") as run:
        left_open = mlflow.start_run(nested=True)
        raise raised
    client = MlflowClient()
    assert client.get_run(left_open.info.run_id).info.status == left_open_ends
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


@pytest.fixture
def stop_on_sigterm():
    """SIGTERM raises KeyboardInterrupt, as in the sweep command; the handler the test found is put back."""
    found = signal.getsignal(signal.SIGTERM)
    interrupt_on(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, found)


@pytest.mark.parametrize("opened", ["job run", "child run"])
def test_a_stop_while_mlflow_creates_a_run_ends_that_run(opened, monkeypatch, stop_on_sigterm):
    """SIGTERM that lands inside mlflow.start_run, once the store holds the new run but before it is on
    MLflow's stack: the run ends as a stopped one does (a job's FAILED, a trial's KILLED), not RUNNING for ever."""
    create = MlflowClient.create_run

    def create_then_stop(self, *args, **kwargs):
        created = create(self, *args, **kwargs)
        signal.raise_signal(signal.SIGTERM)
        return created

    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), contextlib.ExitStack() as stack:
        if opened == "child run":
            stack.enter_context(tracking.job_run("smoke", "sweep"))
        monkeypatch.setattr(MlflowClient, "create_run", create_then_stop)
        stack.enter_context(tracking.job_run("smoke", "teacher") if opened == "job run" else tracking.child_run("trial", "student-trial", {}))
        pytest.fail("the stop did not land")
    runs = {r.data.tags["kd.role"]: r.info.status for r in all_runs()}
    assert runs == ({"teacher": "FAILED"} if opened == "job run" else {"sweep": "FAILED", "student-trial": "KILLED"})


def test_worse_teacher_leaves_the_champion_alias(tmp_path):
    good = teacher_job.run_teacher(build_config(SMOKE, parse_overrides(FAST)))
    worse = teacher_job.run_teacher(build_config(SMOKE, parse_overrides(FAST + ["train.epochs=1", "train.learning_rate=1e-6"])))
    assert good.promoted and not worse.promoted
    assert worse.val_accuracy < good.val_accuracy
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("smoke-teacher", "champion").version) == good.version
    assert worse.version != good.version  # still registered, just not the champion
    tags = client.get_run(worse.run_id).data.tags
    assert tags["champion.promoted"] == "false"
    assert tags["champion.previous_version"] == good.version


def test_failure_after_training_marks_run_failed_and_leaves_registry_unchanged(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mlflow, "log_artifacts", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        teacher_job.run_teacher(build_config(SMOKE, parse_overrides(FAST + ["train.epochs=1"])))
    client = MlflowClient()
    (run,) = all_runs()
    assert run.info.status == "FAILED"
    assert client.search_registered_models() == []


def bad(tmp_path, *args):
    """Run the CLI in-process on the smoke experiment; return (exit code, stderr)."""
    return main(["teacher", "--experiment", str(SMOKE), *args])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.learning_rate=0"], "train.learning_rate = 0.0 is out of range; expected a number > 0"),
        (["train.epochs=0"], "train.epochs = 0 is out of range"),
        (["train.batch_size=0"], "train.batch_size = 0 is out of range"),
        (["train.epochs=two"], "train.epochs = 'two' has the wrong type; expected an integer"),
        (["train.nope=1"], "unknown key 'train.nope'"),
        (["data.source=./missing-data"], "data: source './missing-data' does not exist"),
        (["data.source=stanfordnlp/sst2"], "is not a local path and the Hugging Face Hub is offline"),
        (["teacher.name_or_path=bert-large-uncased"], "is not a local folder and the Hugging Face Hub is offline"),
        (["teacher.name_or_path=./no-model"], "teacher.name_or_path: './no-model' does not exist"),
        (["data.text_column=review"], "has no column 'review'"),
    ],
)
def test_bad_input_one_message_no_run_no_registry(tmp_path, capsys, overrides, message):
    assert bad(tmp_path, *overrides) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert err.count("error:") == 1
    assert_nothing_half_made(MlflowClient())


def test_bad_data_and_model_folders(tmp_path, capsys):
    folder = tmp_path / "data"
    write_tsv(folder / "train.tsv", [("fine", 0), ("odd", 7)])
    write_tsv(folder / "dev.tsv", [("ok", 1)])
    assert bad(tmp_path, f"data.source={folder}") == 2
    assert "train.tsv line 3: label '7' is not in the label set" in capsys.readouterr().err
    write_tsv(folder / "train.tsv", [("fine", 0)])
    write_tsv(folder / "dev.tsv", [])
    assert bad(tmp_path, f"data.source={folder}") == 2
    assert "dev.tsv is empty" in capsys.readouterr().err
    (folder / "train.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe bad\t1\n")
    assert bad(tmp_path, f"data.source={folder}") == 2
    assert "is not UTF-8" in capsys.readouterr().err
    (tmp_path / "empty-model").mkdir()
    assert bad(tmp_path, f"teacher.name_or_path={tmp_path / 'empty-model'}") == 2
    assert "is not a model folder (no config.json)" in capsys.readouterr().err
    assert_nothing_half_made(MlflowClient())


def test_bad_input_under_mlflow_run_exits_non_zero_with_one_message(tmp_path):
    done = mlflow_run(tmp_path, "teacher", "train.learning_rate=-1")
    assert done.returncode != 0
    assert "error: config: train.learning_rate = -1.0 is out of range; expected a number > 0" in done.stderr
    client = MlflowClient()
    assert [r.info.status for r in all_runs()] == ["FAILED"]  # the launcher's run, marked by mlflow run
    assert client.search_registered_models() == []


def test_an_artifact_gone_from_the_store_is_named_in_one_message(tmp_path):
    with mlflow.start_run(experiment_id=mlflow.create_experiment("artifacts")) as run:  # not an earlier test's experiment
        tracking.log_array("logits/eval.npy", np.arange(3))
    assert tracking.load_array(run.info.run_id, "logits/eval.npy").tolist() == [0, 1, 2]
    shutil.rmtree(tmp_path / "mlruns")  # the store's artifacts, moved or deleted with the folder they were in
    with pytest.raises(KDError, match=rf"run {run.info.run_id}: its artifact 'logits/eval.npy' cannot be read from .*mlruns"):
        tracking.load_array(run.info.run_id, "logits/eval.npy")
