"""The registry: registration that is idempotent and leaves nothing behind, and an honest champion lookup."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kdlib import registry
from kdlib.errors import KDError


def logged_model() -> tuple[str, str]:
    """(model URI, run id) of a fresh MLflow 3 logged model, the kind every job registers."""
    mlflow.set_experiment("registry")  # this test's store, whatever an earlier test made active
    with mlflow.start_run() as run:
        model = mlflow.initialize_logged_model("model")
    return f"models:/{model.model_id}", run.info.run_id


def versions(name: str) -> list[str]:
    return sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


def test_registering_the_same_model_twice_gives_one_version():
    uri, run_id = logged_model()
    with registry.registered_version(uri, "m", run_id, description="first", tags={"k": "v"}) as first:
        pass
    with registry.registered_version(uri, "m", run_id) as again:
        pass
    assert first == again == "1" and versions("m") == ["1"]
    made = MlflowClient().get_model_version("m", "1")
    assert made.description == "first" and made.tags == {"k": "v"}


def test_two_workers_registering_at_once_keep_the_older_version(monkeypatch):
    uri, run_id = logged_model()
    with registry.registered_version(uri, "m", run_id):
        pass
    # The second worker looked before the first registered: it creates a version, then finds the older one.
    monkeypatch.setattr(registry, "_has_model", lambda client, name: False)
    with registry.registered_version(uri, "m", run_id) as version:
        assert version == "1"
    assert versions("m") == ["1"]


def test_a_failure_after_registering_leaves_the_registry_as_it_was():
    uri, run_id = logged_model()
    with pytest.raises(RuntimeError), registry.registered_version(uri, "new", run_id):
        raise RuntimeError("promotion failed")
    assert MlflowClient().search_registered_models() == []  # no empty registered model left

    kept, kept_run = logged_model()
    with registry.registered_version(kept, "m", kept_run):
        pass
    with pytest.raises(RuntimeError), registry.registered_version(uri, "m", run_id):
        raise RuntimeError("promotion failed")
    assert versions("m") == ["1"]


def test_only_not_found_means_no_champion(monkeypatch):
    assert registry.champion("nothing-registered") is None
    MlflowClient().create_registered_model("no-alias")
    assert registry.champion("no-alias") is None

    def server_error(self, name, alias):
        raise MlflowException("API request to endpoint failed with error code 503", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", server_error)
    with pytest.raises(KDError, match="registry: cannot read the 'champion' alias of 'm' from .*503"):
        registry.champion("m")
