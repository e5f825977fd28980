"""The evaluate job: accuracy, teacher agreement, size and latency of any model URI, logged and printed.

Latency is measured through the serving backends (kdlib/inference.py), after untimed warm-up calls.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdlib import registry, tracking
from kdlib.config import EvaluateConfig, ExperimentConfig
from kdlib.data import TextSplit, load_split
from kdlib.inference import Latency, backend_name, footprint, load_backend, measure_latency, predict_all
from kdlib.metrics import accuracy, agreement
from kdlib.registry import ModelSource


@dataclass(frozen=True)
class Evaluation:
    run_id: str
    model_uri: str
    backend: str  # "pytorch fp32", "pytorch bf16", "onnxruntime"
    split: str
    n_examples: int
    accuracy: float
    agreement: float | None  # share of sentences where the teacher predicts the same label
    parameters: int
    size_mb: float
    latency: Latency


def _teacher_logits(cfg: ExperimentConfig, source: ModelSource, own: np.ndarray, split: TextSplit, tmp: str) -> np.ndarray | None:
    """Teacher logits for agreement: evaluate.teacher_uri, else the champion teacher if there is one."""
    uri = cfg.evaluate.teacher_uri
    if uri and uri.lower() == "none":
        return None
    if uri is None:
        name = registry.teacher_model_name(cfg)
        if registry.champion(name) is None:
            print(f"evaluate: no champion teacher {name!r}, so no agreement is measured")
            return None
        uri = registry.champion_uri(name)
    teacher = registry.fetch_model(uri, str(Path(tmp) / "teacher"))
    if (teacher.run_id, teacher.kind) == (source.run_id, source.kind):
        return own  # a run logs one model of each kind: this is the teacher itself
    return predict_all(load_backend(teacher, "fp32", torch.get_num_threads()), split.texts)


def run_evaluate(cfg: ExperimentConfig) -> Evaluation:
    """Everything is computed before the MLflow run opens, so a failure leaves no half-logged run."""
    ev = cfg.evaluate
    uri = ev.model_uri or registry.champion_uri(registry.student_model_name(cfg))
    split_name = ev.split or cfg.data.eval_split
    if ev.threads:
        torch.set_num_threads(ev.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="kd-evaluate-") as tmp:
        source = registry.fetch_model(uri, str(Path(tmp) / "model"))
        split = load_split(cfg.data, split_name, cfg.data.max_eval_examples)
        backend = load_backend(source, ev.precision, threads)
        logits = predict_all(backend, split.texts)
        teacher = _teacher_logits(cfg, source, logits, split, tmp)
        parameters, size_mb = footprint(source, backend)
        latency = measure_latency(backend, split.texts, ev)
    score = accuracy(logits, split.labels)
    agrees = None if teacher is None else agreement(logits, teacher)
    name = backend_name(source, ev.precision)
    metrics = {
        "accuracy": score,
        "parameters": parameters,
        "size_mb": size_mb,
        "threads": latency.threads,
        "latency_batch1_p50_ms": latency.batch1_p50_ms,
        "latency_batch1_p95_ms": latency.batch1_p95_ms,
        f"throughput_batch{latency.batch_size}_per_s": latency.throughput,
        **({} if agrees is None else {"teacher_agreement": agrees}),
    }
    tags = {"kd.model_uri": uri, "kd.backend": name, "kd.source_run_id": source.run_id or ""}
    with tracking.job_run(cfg.name, registry.Role.EVALUATE, tags) as run:
        tracking.log_params({"data.source": cfg.data.source, "split": split_name, "n_examples": len(split), **_settings(ev, uri)})
        tracking.log_metrics(metrics)
        tracking.log_dataset(cfg.data.source, split.name, split.fingerprint, "evaluation")
    return Evaluation(run.info.run_id, uri, name, split_name, len(split), score, agrees, parameters, size_mb, latency)


def _settings(ev: EvaluateConfig, uri: str) -> dict:
    return {f"evaluate.{key}": value for key, value in vars(ev).items() if key != "model_uri"} | {"evaluate.model_uri": uri}


def table(results: list[Evaluation]) -> str:
    """A markdown table, one row per evaluation."""
    head = ["model", "backend", "split (n)", "accuracy", "agreement", "parameters", "size MB", "threads", "batch-1 p50 ms", "p95 ms", "sentences/s"]
    rows = [
        [
            r.model_uri,
            r.backend,
            f"{r.split} ({r.n_examples})",
            f"{r.accuracy:.4f}",
            "-" if r.agreement is None else f"{r.agreement:.4f}",
            f"{r.parameters / 1e6:.1f} M",
            f"{r.size_mb:.1f}",
            str(r.latency.threads),
            f"{r.latency.batch1_p50_ms:.2f}",
            f"{r.latency.batch1_p95_ms:.2f}",
            f"{r.latency.throughput:.0f} (batch {r.latency.batch_size})",
        ]
        for r in results
    ]
    return "\n".join("| " + " | ".join(row) + " |" for row in [head, ["---"] * len(head), *rows])
