"""MLflow runs: the job's run, nested trial runs, params, metrics, artifacts and logged models.

With ``kdlib/registry.py`` this is the only code that imports mlflow (``serving.py`` aside, which
MLflow copies into every model). The store is whatever MLflow resolves: ``MLFLOW_TRACKING_URI``
when set, else ``sqlite:///mlflow.db`` in the working directory (the project root under
``mlflow run``), so ``mlflow ui`` started there shows every run.
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
import numpy as np
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from kdlib.configure import flatten
from kdlib.data import Splits
from kdlib.errors import KDError, stops_held
from kdlib.models import Classifier
from kdlib.serving import HF_MODEL, label_names

SERVING_CODE = Path(__file__).with_name("serving.py")
# Stored with every model (MLflow checks the model answers it when logging): what a caller sends.
INPUT_EXAMPLE = ["a gorgeous, witty film", "a tedious mess"]
# A run started by `mlflow run` hands its id to the command through this variable.
LAUNCHER_RUN = "MLFLOW_RUN_ID"
# Every run names its experiment here, wherever `mlflow run` filed it.
EXPERIMENT_TAG = "kd.experiment"
ROLE_TAG = "kd.role"  # what the run is: its values are registry.Role's
MODEL = "model"  # the artifact path of a training run's model
# The launcher's run id once a job of this process has used it (MLflow drops the variable when that run ends).
_launcher_used: str | None = None


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


@contextlib.contextmanager
def job_run(experiment: str, role: str, tags: dict[str, str] | None = None, run_name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run a job logs to; FAILED if the job raises, with the runs left open above it (``_ending_runs_above``).
    Ctrl-C or SIGTERM while MLflow creates the run waits until the run can be ended (``stops_held``).

    Under ``mlflow run`` it is the launcher's run, the one ``mlflow run`` prints, in whichever
    MLflow experiment ``--experiment-name`` chose (else "Default"); a second job of the same command
    (``main``: teacher, then sweep) logs to a child of it. Otherwise a new run in ``experiment``.
    """
    global _launcher_used
    tags = {**(tags or {}), ROLE_TAG: role, EXPERIMENT_TAG: experiment}
    run_name = run_name or role
    launcher = _launcher_used or os.environ.get(LAUNCHER_RUN)
    if launcher and not _launcher_used:
        _launcher_used = launcher
        experiment_id = MlflowClient().get_run(launcher).info.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
        with stops_held() as release, mlflow.start_run(run_id=launcher) as run, _ending_runs_above(run):
            release()
            mlflow.set_tags({**tags, "mlflow.runName": run_name})
            yield run
        return
    if launcher:
        # Reopen the launcher's run as the parent, so this job's run nests under what `mlflow run` printed.
        with (
            stops_held() as release,
            mlflow.start_run(run_id=launcher),
            mlflow.start_run(run_name=run_name, tags=tags, nested=True) as run,
            _ending_runs_above(run),
        ):
            release()
            yield run
        return
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    with stops_held() as release, mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run, _ending_runs_above(run):
        release()
        yield run


def _ended(exc: BaseException | None, finished_on: tuple[type[BaseException], ...] = ()) -> str:
    """The status of a run whose block ended with ``exc``: FINISHED without one or on one of
    ``finished_on``, KILLED on Ctrl-C, FAILED otherwise."""
    if exc is None or isinstance(exc, finished_on):
        return "FINISHED"
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


@contextlib.contextmanager
def _ending_runs_above(run: mlflow.ActiveRun) -> Iterator[None]:
    """Runs that the job opens above its own on MLflow's stack and leaves open when it raises end with
    it (``_ended``). A library's callback may open a run per trial and end it only at the trial's end
    (the Trainer's MLflow callback); left on the stack, it would take the end meant for the job's run,
    which would stay RUNNING."""
    try:
        yield
    except BaseException as exc:
        while (top := mlflow.active_run()) is not None and top.info.run_id != run.info.run_id:
            mlflow.end_run(_ended(exc))
        raise


@contextlib.contextmanager
def child_run(run_name: str, role: str, tags: dict[str, str], finished_on: tuple[type[BaseException], ...] = ()) -> Iterator[mlflow.ActiveRun]:
    """A run nested under the active one: FINISHED when the block ends or raises one of ``finished_on``
    (a pruned trial ended as planned), KILLED on Ctrl-C, FAILED otherwise. The parent stays open."""
    parent = mlflow.active_run()
    # The parent's project tags, read from the store: the active run's copy misses tags set after it started.
    parent_tags = MlflowClient().get_run(parent.info.run_id).data.tags
    inherited = {EXPERIMENT_TAG: parent_tags[EXPERIMENT_TAG]} if EXPERIMENT_TAG in parent_tags else {}
    with stops_held() as release:  # a stop while MLflow creates the run waits until it can end it
        run = mlflow.start_run(run_name=run_name, nested=True, tags={**inherited, **tags, ROLE_TAG: role}, experiment_id=parent.info.experiment_id)
        exc = None
        try:
            release()
            yield run
        except BaseException as raised:
            exc = raised
            raise
        finally:
            mlflow.end_run(_ended(exc, finished_on))


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


def _dataset_source(source: str, split: str):
    """MLflow's description of where a split came from: a local folder, a hub dataset, or generated data."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if Path(source).expanduser().exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # two local resolvers claim a path; either describes it
            return resolve_dataset_source(str(Path(source).expanduser().resolve()))
    if ":" in source:  # builtin:sentiment and other generated data
        return CodeDatasetSource({"kd.source": source, "kd.split": split})
    return HuggingFaceDatasetSource(path=source, split=split)


def log_dataset(source: str, split: str, digest: str, context: str) -> None:
    """Log a data split as an input of the active run, under its content fingerprint (``digest``)."""
    from mlflow.data.meta_dataset import MetaDataset

    mlflow.log_input(MetaDataset(_dataset_source(source, split), name=f"{source}:{split}", digest=digest), context=context)


def log_splits(source: str, splits: Splits) -> None:
    """The splits a run trained on, was chosen on and was scored on, as its dataset inputs."""
    log_dataset(source, splits.train.name, splits.train.fingerprint, "training")
    log_dataset(source, splits.validation.name, splits.validation.fingerprint, "validation")
    log_dataset(source, splits.eval.name, splits.eval.fingerprint, "evaluation")


@contextlib.contextmanager
def pending_model(name: str = MODEL) -> Iterator[str]:
    """An MLflow 3 logged model made before training, so every epoch's metrics link to it (``log_epoch``);
    ``log_classifier`` with its id fills it. Deleted if the block raises (a failed or pruned run has no model)."""
    run = mlflow.active_run()
    model = mlflow.initialize_logged_model(name, source_run_id=run.info.run_id, experiment_id=run.info.experiment_id)
    try:
        yield model.model_id
    except BaseException:
        MlflowClient().delete_logged_model(model.model_id)
        raise


def log_params(params: dict[str, Any]) -> None:
    # `mlflow run -P key=value` already logged its parameters on the launcher's run, and MLflow
    # refuses to log a param twice: keep those (they hold the same setting as the user typed it).
    logged = mlflow.get_run(active_run_id()).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def log_config(cfg: Any, sections: tuple[str, ...], extra: dict[str, Any]) -> None:
    """The settings that apply to this run (``name`` and the config ``sections`` it uses), and ``extra``."""
    log_params({**{k: v for k, v in flatten(cfg).items() if k == "name" or k.split(".")[0] in sections}, **extra})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(metrics, step=step)


def log_epoch(epoch: int, metrics: dict[str, float], model_id: str | None = None) -> None:
    """One epoch's metrics on the active run, linked to the model being trained when ``model_id`` is given."""
    mlflow.log_metrics(metrics, step=epoch, model_id=model_id)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def nest_under(parent_run_id: str) -> None:
    """Show the active run as a child of ``parent_run_id`` in ``mlflow ui``."""
    mlflow.set_tag("mlflow.parentRunId", parent_run_id)


def log_folder(local: Path, artifact_path: str, tag: str) -> None:
    """Log a local folder as an artifact of the active run, and name it in ``tag`` for readers."""
    mlflow.log_artifacts(str(local), artifact_path)
    mlflow.set_tag(tag, artifact_path)


def run_tag(run_id: str, key: str) -> str | None:
    return MlflowClient().get_run(run_id).data.tags.get(key)


def get_run(run_id: str):
    return MlflowClient().get_run(run_id)


def fail_if_running(run_id: str, why: str) -> None:
    """Mark a run whose process died FAILED, with the reason as a tag (no-op if it already ended)."""
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")
        client.set_tag(run_id, "optuna.failure", why)


def metric_history(run_id: str, key: str) -> dict[int, float]:
    """step -> value of one metric of a run."""
    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, key)}


def find_runs(experiment: str, filter_string: str) -> list:
    """Runs this project logged for ``experiment`` (in any MLflow experiment) that match a filter, newest first."""
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, f"tags.`{EXPERIMENT_TAG}` = '{experiment}' and {filter_string}", order_by=["attributes.start_time DESC"])


def log_array(path: str, array: np.ndarray) -> None:
    """Log a NumPy array as the active run's artifact ``path`` (a .npy file)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path).name
        np.save(local, array)
        mlflow.log_artifact(str(local), str(Path(path).parent))


def load_array(run_id: str, path: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        return np.load(download_run_artifact(run_id, path, tmp))


def artifact_exists(run_id: str, path: str) -> bool:
    parent = path.rpartition("/")[0] or None
    return any(item.path == path for item in MlflowClient().list_artifacts(run_id, parent))


def log_folder_to(run_id: str, local: Path, artifact_path: str) -> None:
    """Log a folder to a run that may have ended (the teacher's run, when a student labels a transfer set)."""
    MlflowClient().log_artifacts(run_id, str(local), artifact_path)


def download_run_artifact(run_id: str, path: str, dst: str) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst))
    except mlflow.exceptions.MlflowException as exc:
        root = MlflowClient().get_run(run_id).info.artifact_uri
        raise KDError(
            f"run {run_id}: its artifact {path!r} cannot be read from {root} ({str(exc).splitlines()[0]}); expected the "
            "artifacts where the run logged them (a local store's ./mlruns stays in the folder its first run started in)"
        ) from None


def log_files_to(run_id: str, paths: list[Path], artifact_path: str) -> None:
    """Log files to a run that may have ended (the sweep's parent run, after the sweep)."""
    client = MlflowClient()
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def _requirements(packages: tuple[str, ...]) -> list[str]:
    # Pinned explicitly: MLflow's inference would load the model in a subprocess to guess them.
    return [f"{pkg}=={metadata.version(pkg).split('+')[0]}" for pkg in ("mlflow", *packages, "transformers", "pandas")]


def log_text_classifier(folder: Path, kind: str, names: list[str], max_length: int, name: str, model_id: str | None = None) -> str:
    """Log ``folder`` (a Hugging Face folder for ``hf_model``, model.onnx + tokenizer for ``onnx_model``)
    as a pyfunc model that answers raw strings with labels and probabilities; returns its model URI."""
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),  # unnamed: a plain list of strings is valid input
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")] + [ColSpec("double", f"prob_{n}") for n in names]),
    )
    with warnings.catch_warnings():
        # The signature above is explicit; MLflow's advice to add type hints does not apply.
        warnings.filterwarnings("ignore", message=".*Add type hints")
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVING_CODE),
            artifacts={kind: str(folder)},
            model_config={"max_length": max_length},
            signature=signature,
            input_example=INPUT_EXAMPLE,
            model_id=model_id,
            pip_requirements=_requirements(("torch",) if kind == HF_MODEL else ("onnxruntime",)),
        )
    return info.model_uri


def log_classifier(classifier: Classifier, max_length: int, name: str = MODEL, model_id: str | None = None) -> str:
    """Log a PyTorch classifier for raw strings; returns its model URI."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / HF_MODEL  # the folder's name is kept inside the logged model
        classifier.model.save_pretrained(folder)
        classifier.tokenizer.save_pretrained(folder)
        return log_text_classifier(folder, HF_MODEL, label_names(classifier.model.config.to_dict()), max_length, name, model_id)
