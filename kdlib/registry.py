"""The MLflow Model Registry: model names, roles, the champion and how models are fetched.

One copy of each fact: ``<experiment>-teacher`` / ``<experiment>-student``, the ``champion`` alias,
the metric a champion must beat (``dev_accuracy``), the ``kd.role`` of every run, registration that
leaves the registry unchanged when anything after it fails, and promotion that moves the alias only
for a better model and logs the comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kdlib.config import ExperimentConfig
from kdlib.errors import KDError
from kdlib.serving import HF_MODEL, ONNX_MODEL

CHAMPION = "champion"
# The champion metric: the teacher, each student and each trial log it per epoch; the last epoch's counts.
METRIC = "dev_accuracy"
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<model name>"


class Role:
    """Values of the ``kd.role`` run tag."""

    TEACHER = "teacher"
    STUDENT = "student"  # the distill job
    TRIAL = "student-trial"
    PLAIN_STUDENT = "plain-student"  # the bench's alpha = 0 baseline
    SWEEP = "sweep"
    EVALUATE = "evaluate"
    EXPORT = "export"


def teacher_model_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-teacher"


def student_model_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-student"


def champion_uri(model_name: str) -> str:
    return f"models:/{model_name}@{CHAMPION}"


def champion(model_name: str):
    """The registered version holding ``champion``, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def champion_metric(model_name: str) -> tuple[str | None, float | None]:
    """The version that holds the ``champion`` alias and its run's champion metric, or (None, None)."""
    version = champion(model_name)
    if version is None:
        return None, None
    value = MlflowClient().get_run(version.run_id).data.metrics.get(METRIC) if version.run_id else None
    return version.version, value


def champion_version(model_name: str, hint: str):
    """The registered version holding ``champion``; a KDError that says what to run when there is none."""
    version = champion(model_name)
    if version is None:
        raise KDError(f"no registered model {model_name!r} with alias {CHAMPION!r} in the MLflow store {mlflow.get_tracking_uri()}; {hint}")
    return version


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


def promote_if_better(model_name: str, version: str, value: float) -> bool:
    """Move ``champion`` to ``version`` only if it beats the current champion; log the comparison."""
    previous_version, previous_value = champion_metric(model_name)
    promoted = previous_value is None or value > previous_value
    if promoted:
        MlflowClient().set_registered_model_alias(model_name, CHAMPION, version)
    mlflow.set_tags(
        {
            "champion.model": model_name,
            "champion.version": version,
            "champion.previous_version": previous_version or "none",
            f"champion.previous_{METRIC}": "none" if previous_value is None else f"{previous_value:.6f}",
            f"champion.candidate_{METRIC}": f"{value:.6f}",
            "champion.promoted": str(promoted).lower(),
        }
    )
    return promoted


def register_and_promote(model_uri: str, model_name: str, value: float, run_id: str | None = None) -> tuple[str, bool]:
    """Register a model and move ``champion`` to it if it is better: (version, promoted)."""
    with registered_version(model_uri, model_name, run_id) as version:
        return version, promote_if_better(model_name, version, value)


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
    max_length = int(pyfunc["config"]["max_length"])  # every model this project logs records it
    return ModelSource(uri, kind, root / artifacts[kind]["path"], max_length, info.run_id, name, version)


def set_version_tag(source: ModelSource, key: str, value: str) -> None:
    """Tag the registered version ``source`` came from (no-op for an unregistered model)."""
    if source.registered_name:
        MlflowClient().set_model_version_tag(source.registered_name, source.registered_version, key, value)
