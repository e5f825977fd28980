"""Everything that talks to MLflow: runs, params, metrics, models, the registry and its aliases.

The store is whatever MLflow resolves: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///mlflow.db``
in the working directory (the project root under ``mlflow run``), so ``mlflow ui`` started there
shows every run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from kdlib.config import flatten
from kdlib.errors import KDError
from kdlib.models import Classifier

CHAMPION = "champion"
SERVING_CODE = Path(__file__).with_name("serving.py")
HF_MODEL = "hf_model"  # the artifact key serving.py reads
# A run started by `mlflow run` hands its id to the command through this variable.
LAUNCHER_RUN = "MLFLOW_RUN_ID"


@contextlib.contextmanager
def job_run(experiment: str, run_name: str, tags: dict[str, str]) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run a job logs to, in the experiment its config names; FAILED if the job raises.

    Under ``mlflow run`` the launcher already opened a run, in the experiment given by
    ``--experiment-name`` or else in "Default". If that is this experiment, the job logs to it;
    otherwise the job opens its own run here and leaves a pointer to it on the launcher's run.
    """
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    launcher = os.environ.get(LAUNCHER_RUN)
    run_id = None
    if launcher:
        client = MlflowClient()
        if client.get_run(launcher).info.experiment_id == experiment_id:
            run_id = launcher
        else:
            # mlflow.start_run() would otherwise resume the launcher's run in the other experiment.
            del os.environ[LAUNCHER_RUN]
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=None if run_id else run_name, tags=tags) as run:
        if run_id:
            mlflow.set_tags({**tags, "mlflow.runName": run_name})
        elif launcher:
            note = f"This launcher run's work was logged in experiment {experiment!r}, run {run.info.run_id}."
            client.set_tag(launcher, "mlflow.note.content", note)
            client.set_tag(launcher, "kd.run_id", run.info.run_id)
        yield run


def log_config(cfg: Any, extra: dict[str, Any]) -> None:
    # `mlflow run -P key=value` already logged its parameters on the launcher's run, and MLflow
    # refuses to log a param twice: keep those (they hold the same setting as the user typed it).
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in {**flatten(cfg), **extra}.items() if k not in logged})


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


def log_folder(local: Path, artifact_path: str, tag: str) -> None:
    """Log a local folder as an artifact of the active run, and name it in ``tag`` for readers."""
    mlflow.log_artifacts(str(local), artifact_path)
    mlflow.set_tag(tag, artifact_path)


def run_tag(run_id: str, key: str) -> str | None:
    return MlflowClient().get_run(run_id).data.tags.get(key)


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics, step=epoch)


def _requirements() -> list[str]:
    # Pinned explicitly: MLflow's inference would load the model in a subprocess to guess them.
    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in ("mlflow", "torch", "transformers", "pandas")]


def log_classifier(classifier: Classifier, max_length: int, name: str = "model") -> str:
    """Log a classifier that predicts labels and probabilities for raw strings; returns its model URI."""
    names = [classifier.model.config.id2label[i] for i in range(classifier.model.config.num_labels)]
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a plain list of strings is valid input
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")] + [ColSpec("double", f"prob_{n}") for n in names]),
    )
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The signature above is explicit; MLflow's advice to add an input example does not apply.
        warnings.filterwarnings("ignore", message=".*(Add type hints|An input example was not provided)")
        folder = Path(tmp) / HF_MODEL  # the folder's name is kept inside the logged model
        classifier.model.save_pretrained(folder)
        classifier.tokenizer.save_pretrained(folder)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVING_CODE),
            artifacts={HF_MODEL: str(folder)},
            model_config={"max_length": max_length},
            signature=signature,
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _champion(model_name: str):
    """The registered version holding ``champion``, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def champion_metric(model_name: str, metric: str) -> tuple[str | None, float | None]:
    """The version that holds the ``champion`` alias and its run's ``metric``, or (None, None)."""
    version = _champion(model_name)
    if version is None:
        return None, None
    value = MlflowClient().get_run(version.run_id).data.metrics.get(metric) if version.run_id else None
    return version.version, value


@contextlib.contextmanager
def registered_version(model_uri: str, model_name: str, run_id: str | None = None) -> Iterator[str]:
    """Register ``model_uri`` (logged by ``run_id``, default the active run); if the block raises,
    delete the new version so the registry is unchanged."""
    client = MlflowClient()
    try:
        client.get_registered_model(model_name)
        created_model = False
    except MlflowException:
        client.create_registered_model(model_name)
        created_model = True
    version = client.create_model_version(model_name, model_uri, run_id=run_id or mlflow.active_run().info.run_id).version
    try:
        yield str(version)
    except BaseException:
        if created_model:
            client.delete_registered_model(model_name)
        else:
            client.delete_model_version(model_name, version)
        raise


def promote_if_better(model_name: str, version: str, metric: str, value: float) -> bool:
    """Move ``champion`` to ``version`` only if it beats the current champion; log the comparison."""
    previous_version, previous_value = champion_metric(model_name, metric)
    promoted = previous_value is None or value > previous_value
    if promoted:
        MlflowClient().set_registered_model_alias(model_name, CHAMPION, version)
    mlflow.set_tags(
        {
            "champion.model": model_name,
            "champion.version": version,
            "champion.previous_version": previous_version or "none",
            f"champion.previous_{metric}": "none" if previous_value is None else f"{previous_value:.6f}",
            f"champion.candidate_{metric}": f"{value:.6f}",
            "champion.promoted": str(promoted).lower(),
        }
    )
    return promoted


def champion_version(model_name: str, hint: str):
    """The registered version holding ``champion``; a KDError that says what to run when there is none."""
    version = _champion(model_name)
    if version is None:
        raise KDError(f"no registered model {model_name!r} with alias {CHAMPION!r} in the MLflow store {mlflow.get_tracking_uri()}; {hint}")
    return version


def download_run_artifact(run_id: str, path: str, dst: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst))


def download_hf_model(model_name: str, version: str, dst: str) -> Path:
    """The Hugging Face folder (weights, config, tokenizer) inside a registered classifier."""
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=dst))
    return root / "artifacts" / HF_MODEL
