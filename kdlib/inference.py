"""Serving backends for a fetched model: load, predict in batches, time, measure the footprint.

Everything goes through the backends that serve the model (``kdlib/serving.py``), from raw strings
to logits (tokenization included), so what evaluate, export and the report measure is what a user
of the registered model gets. Sentences are taken from a fixed shuffle of a split, so every model
sees the same inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdlib.config import EvaluateConfig
from kdlib.errors import KDError
from kdlib.models import count_parameters
from kdlib.registry import ModelSource
from kdlib.serving import BATCH, ONNX_FILE, ONNX_MODEL, OrtBackend, TorchBackend

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.onnx", "*.onnx.data")
Backend = TorchBackend | OrtBackend


@dataclass(frozen=True)
class Latency:
    threads: int
    batch1_p50_ms: float
    batch1_p95_ms: float
    batch_size: int
    throughput: float  # sentences per second at batch_size


def load_backend(source: ModelSource, precision: str = "fp32", threads: int | None = None) -> Backend:
    if source.kind == ONNX_MODEL:
        if precision != "fp32":
            raise KDError(
                f"evaluate.precision = {precision!r} applies to PyTorch models; {source.uri} is an ONNX model, which runs as exported (fp32 or int8)"
            )
        return OrtBackend(source.folder, source.max_length, threads)
    return TorchBackend(source.folder, source.max_length, precision)


def backend_name(source: ModelSource, precision: str) -> str:
    return "onnxruntime" if source.kind == ONNX_MODEL else f"pytorch {precision}"


def predict_all(backend: Backend, texts: list[str]) -> np.ndarray:
    """Logits [len(texts), labels] in input order; batches of similar length waste little padding."""
    order = np.argsort([len(text) for text in texts], kind="stable")
    out = np.empty((len(texts), len(backend.names)), dtype=np.float32)
    for start in range(0, len(texts), BATCH):
        chosen = order[start : start + BATCH]
        out[chosen] = backend.logits([texts[i] for i in chosen])
    return out


def footprint(source: ModelSource, backend: Backend) -> tuple[int, float]:
    """(parameters, MB of weight files on disk)."""
    size = sum(p.stat().st_size for pattern in WEIGHT_FILES for p in Path(source.folder).glob(pattern))
    if isinstance(backend, TorchBackend):
        parameters = count_parameters(backend.model)
    else:
        import onnx

        graph = onnx.load(str(Path(source.folder) / ONNX_FILE), load_external_data=False).graph
        parameters = sum(int(np.prod(init.dims)) for init in graph.initializer)
    return parameters, size / 1e6


def sentence_stream(texts: list[str]):
    """The i-th sentence of a fixed shuffle of ``texts``, wrapping around, so every model sees the same inputs."""
    shuffled = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    return lambda i: shuffled[i % len(shuffled)]


def batch1_times(backend: Backend, pick, start: int, calls: int) -> list[float]:
    """Seconds of each one-sentence call on sentences start .. start + calls - 1 of ``pick``."""
    times = []
    for i in range(start, start + calls):
        started = time.perf_counter()
        backend.logits([pick(i)])
        times.append(time.perf_counter() - started)
    return times


def measure_latency(backend: Backend, texts: list[str], cfg: EvaluateConfig) -> Latency:
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
