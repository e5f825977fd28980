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
from dataclasses import dataclass
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
from kdlib.serving import HF_MODEL, ONNX_MODEL

CHAMPION = "champion"
SERVING_CODE = Path(__file__).with_name("serving.py")
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<model name>"
# Settings of the jobs that act on a trained model; training runs do not log them.
POST_TRAINING = ("evaluate.", "export.", "report.")
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


def log_params(params: dict[str, Any]) -> None:
    # `mlflow run -P key=value` already logged its parameters on the launcher's run, and MLflow
    # refuses to log a param twice: keep those (they hold the same setting as the user typed it).
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def log_config(cfg: Any, extra: dict[str, Any]) -> None:
    """A training run's settings: every config key but those of the post-training jobs, and ``extra``."""
    log_params({**{k: v for k, v in flatten(cfg).items() if not k.startswith(POST_TRAINING)}, **extra})


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


def log_metrics(metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def _requirements(packages: tuple[str, ...]) -> list[str]:
    # Pinned explicitly: MLflow's inference would load the model in a subprocess to guess them.
    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in ("mlflow", *packages, "transformers", "pandas")]


def log_text_classifier(folder: Path, kind: str, label_names: list[str], max_length: int, name: str) -> str:
    """Log ``folder`` (a Hugging Face folder for ``hf_model``, model.onnx + tokenizer for ``onnx_model``)
    as a pyfunc model that answers raw strings with labels and probabilities; returns its model URI."""
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a plain list of strings is valid input
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")] + [ColSpec("double", f"prob_{n}") for n in label_names]),
    )
    with warnings.catch_warnings():
        # The signature above is explicit; MLflow's advice to add an input example does not apply.
        warnings.filterwarnings("ignore", message=".*(Add type hints|An input example was not provided)")
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVING_CODE),
            artifacts={kind: str(folder)},
            model_config={"max_length": max_length},
            signature=signature,
            pip_requirements=_requirements(("torch",) if kind == HF_MODEL else ("onnxruntime",)),
        )
    return info.model_uri


def log_classifier(classifier: Classifier, max_length: int, name: str = "model") -> str:
    """Log a PyTorch classifier for raw strings; returns its model URI."""
    names = [classifier.model.config.id2label[i] for i in range(classifier.model.config.num_labels)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / HF_MODEL  # the folder's name is kept inside the logged model
        classifier.model.save_pretrained(folder)
        classifier.tokenizer.save_pretrained(folder)
        return log_text_classifier(folder, HF_MODEL, names, max_length, name)


def champion(model_name: str):
    """The registered version holding ``champion``, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def champion_metric(model_name: str, metric: str) -> tuple[str | None, float | None]:
    """The version that holds the ``champion`` alias and its run's ``metric``, or (None, None)."""
    version = champion(model_name)
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
    version = champion(model_name)
    if version is None:
        raise KDError(f"no registered model {model_name!r} with alias {CHAMPION!r} in the MLflow store {mlflow.get_tracking_uri()}; {hint}")
    return version


def download_run_artifact(run_id: str, path: str, dst: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst))


@dataclass(frozen=True)
class ModelSource:
    """A text classifier logged by this project, downloaded: where it came from and its files."""

    uri: str
    kind: str  # HF_MODEL (PyTorch) or ONNX_MODEL
    folder: Path  # the Hugging Face folder, or model.onnx with its tokenizer and config
    max_length: int
    run_id: str | None
    registered_name: str | None  # set for models:/<name>@<alias> and models:/<name>/<version>
    registered_version: str | None


def _registered(uri: str) -> tuple[str | None, str | None]:
    """(name, version) of a registry URI; (None, None) for runs:/ and logged-model (models:/m-...) URIs."""
    if not uri.startswith("models:/"):
        return None, None
    ref = uri[len("models:/") :].strip("/")
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = ref.rpartition("/")
    if name and version.isdigit():
        return name, version
    return None, None


def fetch_model(uri: str, dst: str) -> ModelSource:
    """Download the model at ``uri``; a KDError that names the problem if it is missing or not ours."""
    where = f"in the MLflow store {mlflow.get_tracking_uri()}"
    if not uri.startswith(("models:/", "runs:/")):
        raise KDError(f"model_uri {uri!r} is not a model URI; expected {URI_FORMS}")
    try:
        info = mlflow.models.get_model_info(uri)
        name, version = _registered(uri)
    except MlflowException as exc:
        message = str(exc).splitlines()[0]
        if "MLmodel" in message:  # the run exists, but holds no model under that path
            message = "that run has no model there"
        raise KDError(f"model_uri {uri!r} not found {where}: {message}; expected {URI_FORMS}") from None
    pyfunc = info.flavors.get("python_function", {})
    artifacts = pyfunc.get("artifacts", {})
    kind = next((key for key in (HF_MODEL, ONNX_MODEL) if key in artifacts), None)
    if kind is None:
        raise KDError(
            f"model_uri {uri!r} is not a text classifier of this project (no {HF_MODEL!r} or {ONNX_MODEL!r} artifact); "
            "expected a model logged by the teacher, distill, sweep or export job"
        )
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    max_length = int(pyfunc.get("config", {}).get("max_length", 128))
    return ModelSource(uri, kind, root / artifacts[kind]["path"], max_length, info.run_id, name, version)


def champion_uri(model_name: str) -> str:
    return f"models:/{model_name}@{CHAMPION}"


def set_version_tag(source: ModelSource, key: str, value: str) -> None:
    """Tag the registered version ``source`` came from (no-op for an unregistered model)."""
    if source.registered_name:
        MlflowClient().set_model_version_tag(source.registered_name, source.registered_version, key, value)


def find_runs(experiment: str, filter_string: str) -> list:
    """Runs of ``experiment`` (by name) that match an MLflow filter, newest first; [] if no such experiment."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    return MlflowClient().search_runs([found.experiment_id], filter_string, order_by=["attributes.start_time DESC"])


def get_run(run_id: str):
    return MlflowClient().get_run(run_id)


def log_files_to(run_id: str, paths: list[Path], artifact_path: str) -> None:
    """Log files to a run that may have ended (the sweep's parent run, after the sweep)."""
    client = MlflowClient()
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)
