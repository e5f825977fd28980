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


@pytest.mark.parametrize(("value", "winner"), [(0.7, "2"), (0.9, "1")])
def test_two_workers_creating_the_champion_alias_at_once_compare_again(monkeypatch, value, winner):
    """The loser of the race to create the alias reads the winner's champion, then promotes only if better."""
    uri, run_id = logged_model()
    with registry.registered_version(uri, "m", run_id) as ours:
        pass
    theirs_uri, theirs_run = logged_model()
    with mlflow.start_run(run_id=theirs_run):
        mlflow.log_metric(registry.METRIC, 0.8)
    with registry.registered_version(theirs_uri, "m", theirs_run) as theirs:
        pass
    real = MlflowClient.set_registered_model_alias
    raced = []

    def race(client, name, alias, version):
        if not raced:  # the other worker's insert lands first; ours is refused, as a server refuses it
            raced.append(version)
            real(client, name, alias, theirs)
            raise MlflowException("duplicate key value violates unique constraint")
        real(client, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", race)
    with mlflow.start_run(run_id=run_id):
        promoted = registry.promote_if_better("m", ours, value)
    assert promoted == (winner == ours)
    assert str(MlflowClient().get_model_version_by_alias("m", registry.CHAMPION).version) == winner
