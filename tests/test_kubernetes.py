"""The Kubernetes job template for sweep workers: valid against the API's models, and a command the entry module accepts."""

from __future__ import annotations

import shlex

import yaml
from kubernetes.client import ApiClient

from kdlib.__main__ import main
from tests.conftest import ROOT

TEMPLATE = ROOT / "search" / "kubernetes" / "sweep-workers.yaml"


def test_the_worker_job_is_a_valid_indexed_job():
    manifest = yaml.safe_load(TEMPLATE.read_text())
    client = ApiClient()
    job = client._ApiClient__deserialize(manifest, "V1Job")  # the client's own reader of API objects
    # A misspelt or misplaced field would be dropped by the reader: nothing may be lost on the way back.
    assert client.sanitize_for_serialization(job) == manifest
    assert job.spec.completion_mode == "Indexed" and job.spec.parallelism == job.spec.completions >= 2
    container = job.spec.template.spec.containers[0]
    secret = next(e for e in container.env if e.name == "PGPASSWORD")
    assert secret.value is None and secret.value_from.secret_key_ref.key == "password"
    threads = next(e for e in container.env if e.name == "OMP_NUM_THREADS")
    assert threads.value == container.resources.requests["cpu"]  # threads sized to the pod, not the node


def test_the_worker_command_is_one_the_entry_module_accepts(capsys):
    manifest = yaml.safe_load(TEMPLATE.read_text())
    script = manifest["spec"]["template"]["spec"]["containers"][0]["args"][0]
    words = shlex.split(script.replace("$JOB_COMPLETION_INDEX", "3"))
    assert words[:4] == ["exec", "python", "-m", "kdlib"]
    experiment = words.index("--experiment") + 1
    words[experiment] = str(ROOT / words[experiment])
    assert main([*words[4:], "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (
        printed["search"]["seed"] == 3
        and "@" in printed["search"]["storage"]
        and ":" not in printed["search"]["storage"].split("//")[1].split("@")[0]
    )
