"""The MLflow Model Registry: model names, roles, the champion and how models are fetched.

One copy of each fact: ``<experiment>-teacher`` / ``<experiment>-student``, the ``champion`` alias,
the metric a champion must beat (``val_accuracy``) and the one reported beside it (``eval_accuracy``), the ``kd.role`` of every run, registration that
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
# The champion metric: the teacher, each student and each trial log it per epoch on the validation
# split; the last epoch's counts. Pruning, the best trial and the champion use it and nothing else.
METRIC = "val_accuracy"
# Scored once per trained model on the evaluation split, which no choice of a model looks at.
EVAL_METRIC = "eval_accuracy"
GAP = "val_eval_gap"  # METRIC - EVAL_METRIC: how much choosing on validation flattered the model
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<model name>"


class Role:
    """Values of the ``kd.role`` run tag."""

    TEACHER = "teacher"
    STUDENT = "student"  # the distill job
    TRIAL = "student-trial"
    PLAIN_STUDENT = "plain-student"  # the sweep's baseline: alpha = 0, no transfer set
    SWEEP = "sweep"
    EVALUATE = "evaluate"
    EXPORT = "export"
    TRAINER_RECIPE = "trainer-recipe"  # search/benchmarks/trainer_recipe.py: the Hugging Face Trainer baseline of the side-by-side benchmark


def teacher_model_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-teacher"


def student_model_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-student"


def champion_uri(model_name: str) -> str:
    return f"models:/{model_name}@{CHAMPION}"


def _not_found(exc: MlflowException) -> bool:
    """MLflow's answer for a missing model (RESOURCE_DOES_NOT_EXIST) or a missing alias (INVALID_PARAMETER_VALUE)."""
    message = str(exc).lower()
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        exc.error_code == "INVALID_PARAMETER_VALUE" and "alias" in message and "not found" in message
    )


def champion(model_name: str):
    """The registered version holding ``champion``, or None when there is none.

    Only "not found" means no champion: any other answer of the store (a server that is down or
    erring after MLflow's own retries) is a KDError, never read as "no champion yet", which would
    let a worse model take the alias.
    """
    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise KDError(
            f"registry: cannot read the {CHAMPION!r} alias of {model_name!r} from {mlflow.get_tracking_uri()}: {str(exc).splitlines()[0]}"
        ) from None


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


def _model_id(model_uri: str) -> str | None:
    """The logged model's id of a ``models:/m-...`` URI (what MLflow 3's log_model returns), else None."""
    return model_uri[len("models:/") :] if model_uri.startswith("models:/m-") else None


def _versions_of(client: MlflowClient, model_name: str, model_uri: str) -> list[int]:
    """Versions of ``model_name`` registered from ``model_uri``, oldest first."""
    model_id = _model_id(model_uri)
    found = client.search_model_versions(f"name = '{model_name}'")
    return sorted(int(v.version) for v in found if v.source == model_uri or (model_id and v.model_id == model_id))


def _has_model(client: MlflowClient, model_name: str) -> bool:
    try:
        client.get_registered_model(model_name)
        return True
    except MlflowException as exc:
        if _not_found(exc):
            return False
        raise


def _create_model(client: MlflowClient, model_name: str) -> bool:
    """Create the registered model if it does not exist; True if this call created it."""
    try:
        client.create_registered_model(model_name)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_ALREADY_EXISTS":  # another worker, or an earlier job
            return False
        raise


@contextlib.contextmanager
def registered_version(model_uri: str, model_name: str, run_id: str | None = None, description: str = "", tags: dict | None = None) -> Iterator[str]:
    """Register ``model_uri`` (logged by ``run_id``, default the active run) once; if the block raises,
    remove what this call added, so the registry is unchanged.

    Idempotent across workers: a model already registered from ``model_uri`` is reused, and when
    two workers register it at the same moment, both keep the older version and the newer one is
    deleted by the worker that made it. A ``models:/m-...`` URI (an MLflow 3 logged model) is
    registered with its ``model_id``, which a tracking server requires.
    """
    client = MlflowClient()
    existing = _versions_of(client, model_name, model_uri) if _has_model(client, model_name) else []
    if existing:
        yield str(existing[0])
        return
    created_model = _create_model(client, model_name)
    ours = None
    try:
        run_id = run_id or mlflow.active_run().info.run_id
        made = client.create_model_version(
            model_name, model_uri, run_id=run_id, description=description or None, tags=tags, model_id=_model_id(model_uri)
        )
        ours = int(made.version)
        first = _versions_of(client, model_name, model_uri)[0]
        if first != ours:  # another worker registered the same model a moment earlier: keep theirs
            client.delete_model_version(model_name, str(ours))
            ours = None
        yield str(first)
    except BaseException:
        if ours is not None:
            client.delete_model_version(model_name, str(ours))
        # An empty registered model is left to nobody: remove it if this call made it and no one else used it.
        if created_model and not client.search_model_versions(f"name = '{model_name}'"):
            client.delete_registered_model(model_name)
        raise


def promote_if_better(model_name: str, version: str, value: float) -> bool:
    """Move ``champion`` to ``version`` only if it beats the current champion; log the comparison."""
    for attempt in range(2):
        previous_version, previous_value = champion_metric(model_name)
        promoted = previous_value is None or value > previous_value
        if not promoted:
            break
        try:
            MlflowClient().set_registered_model_alias(model_name, CHAMPION, version)
            break
        except MlflowException:
            # Two workers that both found no champion race to create the alias, and a tracking
            # server refuses the second insert: the loser reads the winner's champion and compares again.
            if attempt == 1:
                raise
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


def notes(what: str, value: float, eval_value: float, settings: dict | None = None) -> dict:
    """A version's description and tags, the same for every job: what it is, its validation and
    evaluation accuracy, its settings."""
    settings = settings or {}
    shown = f" with {settings}" if settings else ""
    return {
        "description": f"{what}: {METRIC} {value:.4f}, {EVAL_METRIC} {eval_value:.4f}{shown}.",
        "tags": {METRIC: f"{value:.4f}", EVAL_METRIC: f"{eval_value:.4f}", **{key: str(setting) for key, setting in settings.items()}},
    }


def register_and_promote(
    model_uri: str, model_name: str, value: float, run_id: str | None = None, description: str = "", tags: dict | None = None
) -> tuple[str, bool]:
    """Register a model and move ``champion`` to it if it is better: (version, promoted)."""
    with registered_version(model_uri, model_name, run_id, description, tags) as version:
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
