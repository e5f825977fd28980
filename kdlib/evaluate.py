"""The evaluate job: accuracy, teacher agreement, size and latency of any model URI, logged and printed.

Latency is measured through the same backends that serve the model (kdlib/serving.py), from raw
strings to logits (tokenization included), after untimed warm-up calls, on the split's own sentences
in a fixed shuffled order, so every model sees the same inputs.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdlib import tracking
from kdlib.config import EvaluateConfig, ExperimentConfig
from kdlib.data import TextSplit, load_split
from kdlib.distill import student_model_name
from kdlib.errors import KDError
from kdlib.serving import ONNX_FILE, ONNX_MODEL, OrtBackend, TorchBackend
from kdlib.teacher import teacher_model_name
from kdlib.tracking import ModelSource

BATCH = 64
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.onnx", "*.onnx.data")


@dataclass(frozen=True)
class Latency:
    threads: int
    batch1_p50_ms: float
    batch1_p95_ms: float
    batch_size: int
    throughput: float  # sentences per second at batch_size


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


def load_backend(source: ModelSource, precision: str, threads: int) -> TorchBackend | OrtBackend:
    if source.kind == ONNX_MODEL:
        if precision != "fp32":
            raise KDError(
                f"evaluate.precision = {precision!r} applies to PyTorch models; {source.uri} is an ONNX model, which runs as exported (fp32 or int8)"
            )
        return OrtBackend(source.folder, source.max_length, threads)
    return TorchBackend(source.folder, source.max_length, precision)


def backend_name(source: ModelSource, precision: str) -> str:
    return "onnxruntime" if source.kind == ONNX_MODEL else f"pytorch {precision}"


def predict_all(backend: TorchBackend | OrtBackend, texts: list[str]) -> np.ndarray:
    """Logits for every text, in input order; batches of similar length waste little padding."""
    order = np.argsort([len(text) for text in texts], kind="stable")
    out = np.empty((len(texts), len(backend.names)), dtype=np.float32)
    for start in range(0, len(texts), BATCH):
        chosen = order[start : start + BATCH]
        out[chosen] = backend.logits([texts[i] for i in chosen])
    return out


def footprint(source: ModelSource, backend: TorchBackend | OrtBackend) -> tuple[int, float]:
    """(parameters, MB of weight files on disk)."""
    size = sum(p.stat().st_size for pattern in WEIGHT_FILES for p in Path(source.folder).glob(pattern))
    if isinstance(backend, TorchBackend):
        parameters = sum(p.numel() for p in backend.model.parameters())
    else:
        import onnx

        graph = onnx.load(str(Path(source.folder) / ONNX_FILE), load_external_data=False).graph
        parameters = sum(int(np.prod(init.dims)) for init in graph.initializer)
    return parameters, size / 1e6


def sentence_stream(texts: list[str]):
    """The i-th sentence of a fixed shuffle of ``texts``, wrapping around, so every model sees the same inputs."""
    shuffled = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    return lambda i: shuffled[i % len(shuffled)]


def batch1_times(backend: TorchBackend | OrtBackend, pick, start: int, calls: int) -> list[float]:
    """Seconds of each one-sentence call on sentences start .. start + calls - 1 of ``pick``."""
    times = []
    for i in range(start, start + calls):
        started = time.perf_counter()
        backend.logits([pick(i)])
        times.append(time.perf_counter() - started)
    return times


def measure_latency(backend: TorchBackend | OrtBackend, texts: list[str], cfg: EvaluateConfig) -> Latency:
    """Batch-1 p50/p95 over ``cfg.latency_calls`` sentences and throughput over batches of the split's sentences."""
    pick = sentence_stream(texts)
    batch1_times(backend, pick, 0, cfg.warmup)
    times = batch1_times(backend, pick, 0, cfg.latency_calls)
    size = cfg.throughput_batch_size
    batches = [[pick(b * size + j) for j in range(size)] for b in range(cfg.throughput_batches)]
    backend.logits(batches[0])
    started = time.perf_counter()
    for batch in batches:
        backend.logits(batch)
    elapsed = time.perf_counter() - started
    p50, p95 = np.percentile(np.array(times) * 1e3, [50, 95])
    threads = backend.threads if isinstance(backend, OrtBackend) else torch.get_num_threads()
    return Latency(threads, float(p50), float(p95), size, size * len(batches) / elapsed)


def _teacher_logits(cfg: ExperimentConfig, source: ModelSource, own: np.ndarray, split: TextSplit, tmp: str) -> np.ndarray | None:
    """Teacher logits for agreement: evaluate.teacher_uri, else the champion teacher if there is one."""
    uri = cfg.evaluate.teacher_uri
    if uri and uri.lower() == "none":
        return None
    if uri is None:
        if tracking.champion(teacher_model_name(cfg)) is None:
            print(f"evaluate: no champion teacher {teacher_model_name(cfg)!r}, so no agreement is measured")
            return None
        uri = tracking.champion_uri(teacher_model_name(cfg))
    teacher = tracking.fetch_model(uri, str(Path(tmp) / "teacher"))
    if (teacher.run_id, teacher.kind) == (source.run_id, source.kind):
        return own  # a run logs one model of each kind: this is the teacher itself
    return predict_all(load_backend(teacher, "fp32", torch.get_num_threads()), split.texts)


def run_evaluate(cfg: ExperimentConfig) -> Evaluation:
    """Everything is computed before the MLflow run opens, so a failure leaves no half-logged run."""
    ev = cfg.evaluate
    uri = ev.model_uri or tracking.champion_uri(student_model_name(cfg))
    split_name = ev.split or cfg.data.eval_split
    if ev.threads:
        torch.set_num_threads(ev.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="kd-evaluate-") as tmp:
        source = tracking.fetch_model(uri, str(Path(tmp) / "model"))
        split = load_split(cfg.data, split_name, cfg.data.max_eval_examples)
        backend = load_backend(source, ev.precision, threads)
        logits = predict_all(backend, split.texts)
        teacher = _teacher_logits(cfg, source, logits, split, tmp)
        parameters, size_mb = footprint(source, backend)
        latency = measure_latency(backend, split.texts, ev)
    predictions = logits.argmax(-1)
    accuracy = float((predictions == split.labels).mean())
    agreement = None if teacher is None else float((predictions == teacher.argmax(-1)).mean())
    name = backend_name(source, ev.precision)
    metrics = {
        "accuracy": accuracy,
        "parameters": parameters,
        "size_mb": size_mb,
        "threads": latency.threads,
        "latency_batch1_p50_ms": latency.batch1_p50_ms,
        "latency_batch1_p95_ms": latency.batch1_p95_ms,
        f"throughput_batch{latency.batch_size}_per_s": latency.throughput,
        **({} if agreement is None else {"teacher_agreement": agreement}),
    }
    tags = {"kd.role": "evaluate", "kd.model_uri": uri, "kd.backend": name, "kd.source_run_id": source.run_id or ""}
    with tracking.job_run(cfg.name, "evaluate", tags) as run:
        tracking.log_params({"data.source": cfg.data.source, "split": split_name, "n_examples": len(split), **_settings(ev, uri)})
        tracking.log_metrics(metrics)
    return Evaluation(run.info.run_id, uri, name, split_name, len(split), accuracy, agreement, parameters, size_mb, latency)


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
