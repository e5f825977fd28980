"""The export job: a PyTorch classifier to ONNX, fused by ONNX Runtime's transformer optimizer,
checked in ONNX Runtime, quantized to int8, logged.

The graph has dynamic batch and sequence axes (inputs ``input_ids``, ``attention_mask``, int64;
output ``logits``), so one file serves any batch of any length up to the model's maximum. Three
models come out: ``onnx_fp32`` (the graph as exported), ``onnx_optimized`` (attention, embedding
LayerNorm, LayerNorm and bias-GELU fused into ONNX Runtime's kernels; residual adds kept apart, see
``serving.UNFUSED``) and ``onnx_int8`` (the
optimized graph with int8 weights). Both fp32 graphs must reproduce PyTorch's logits. Everything is
built and checked in a temporary folder before the MLflow run opens: a failed export logs nothing.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from kdlib import registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.data import load_split
from kdlib.errors import KDError
from kdlib.inference import predict_all
from kdlib.metrics import accuracy
from kdlib.registry import ModelSource
from kdlib.serving import ONE_PER_CALL, ONNX_FILE, ONNX_MODEL, OrtBackend, TorchBackend, label_names

if TYPE_CHECKING:
    import onnx

AXES = {0: "batch", 1: "sequence"}
MODELS = {"fp32": "onnx_fp32", "optimized": "onnx_optimized", "int8": "onnx_int8"}  # logged model names
# Blockwise int8's block along the inner dimension. On an sst2-minilm champion (reports/results.md "Two int8 schemes"),
# blocks of 32 moved 1 answer against 3 but took 1.02 ms a sentence against 0.84 ms.
INT8_BLOCK = 128


@dataclass(frozen=True)
class ExportResult:
    run_id: str
    source_uri: str
    model_uris: dict[str, str]  # "fp32" / "optimized" / "int8" -> pyfunc model URI
    max_abs_diff: float  # over the fp32 and optimized graphs
    accuracy: dict[str, float]  # "pytorch", "fp32", "optimized", "int8" -> eval-split accuracy
    fused: dict[str, int]  # fused operator -> how many the optimizer made
    tensorrt: str


def check_classifier(source: ModelSource) -> None:
    if source.kind == ONNX_MODEL:
        raise KDError(f"model_uri {source.uri!r} is already an ONNX model; expected a PyTorch model logged by the teacher, distill or sweep job")
    architectures = AutoConfig.from_pretrained(source.folder).architectures or []
    if not any(arch.endswith("ForSequenceClassification") for arch in architectures):
        raise KDError(
            f"model_uri {source.uri!r} holds {', '.join(architectures) or 'a model of unknown architecture'}, not a sequence classifier; "
            "expected a *ForSequenceClassification model such as the teacher and student jobs log"
        )


class _Logits(torch.nn.Module):
    """The classifier as the graph runs it: (input_ids, attention_mask) -> logits.

    Given no token type ids, BERT-family models gather all-zero ids from a buffer: 15 small nodes
    before the embeddings, which ONNX Runtime runs one by one on every call. Zeros passed in take
    two nodes (a batch-1 call of the int8 sst2-minilm student: 6% less time).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        if model.config.model_type == "bert":
            # BERT's classifier reads the first token's final state only (its pooler takes token 0), so
            # the last layer's feed-forward block runs on that token alone. Attention still sees every
            # token, and the graph before the cut keeps the shape ONNX Runtime's attention fusion matches.
            last = model.base_model.encoder.layer[-1]
            whole = last.feed_forward_chunk
            last.feed_forward_chunk = lambda hidden: whole(hidden[:, :1])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_types = {"token_type_ids": torch.zeros_like(input_ids)} if self.token_types else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **token_types).logits


def export_onnx(folder: Path, dst: Path, opset: int) -> Path:
    """``dst`` gets model.onnx plus the tokenizer and config.json that serving needs.

    The TorchScript exporter (``dynamo=False``) with attention in its eager form, because ONNX
    Runtime's transformer optimizer recognises attention only in that graph: on the dynamo
    exporter's graph of the sst2-minilm student it fused no attention at all (LayerNorm and GELU only).
    """
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    # Two sentences of different lengths, so padding is traced as data, not as a constant shape.
    sample = tokenizer(["a sample sentence for tracing", "short"], padding=True, return_tensors="pt")
    axes = {name: AXES for name in ("input_ids", "attention_mask")} | {"logits": {0: AXES[0]}}
    dst.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on tracing and its deprecation
        torch.onnx.export(
            _Logits(model),
            (sample["input_ids"], sample["attention_mask"]),
            str(dst / ONNX_FILE),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    tokenizer.save_pretrained(dst)
    model.config.save_pretrained(dst)
    return dst


def optimize_transformer(src: Path, dst: Path) -> tuple[Path, dict[str, int]]:
    """ONNX Runtime's transformer optimizer on ``src``'s graph: (folder, fused operator counts).

    The BERT fusions (attention, embedding LayerNorm, LayerNorm, bias + GELU) apply to
    encoders of the BERT family; where a model's graph does not match them it stays unfused, which
    the counts show.
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    config = json.loads((src / "config.json").read_text())
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(f"{ONNX_FILE}*"))
    fusions = FusionOptions("bert")
    fusions.enable_skip_layer_norm = fusions.enable_bias_skip_layer_norm = False  # slower than apart: serving.UNFUSED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimizer.optimize_model(
            str(src / ONNX_FILE),
            model_type="bert",
            num_heads=config["num_attention_heads"],
            hidden_size=config["hidden_size"],
            optimization_options=fusions,
        )
    optimized.save_model_to_file(str(dst / ONNX_FILE))
    return dst, {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


def quantize_int8(src: Path, dst: Path, scheme: str = "dynamic") -> Path:
    """The optimized graph with int8 products (``ExportConfig.int8_scheme``); the head (pooler,
    classifier) stays fp32 in both schemes: it runs on one vector per sentence, where int8 saves no time.

    dynamic: ONNX Runtime's dynamic quantization of attention, the encoder's products and the embeddings:
    int8 weights per output channel in [-64, 64], each call's activations on one int8 scale.
    blockwise: the encoder's products as ``MatMulNBits``, 8-bit weights and activations with a scale per
    block of ``INT8_BLOCK`` along the inner dimension, attention as in dynamic, the embeddings fp32.
    Both scale a call's activations as a whole somewhere (attention), so the graph is marked to take one
    sentence per call (``serving.ONE_PER_CALL``).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(f"{ONNX_FILE}*"))
    model = onnx.load(str(src / ONNX_FILE))
    graph = model.graph
    weights = {tensor.name for tensor in graph.initializer}
    by_type = {kind: [n.name for n in graph.node if n.op_type == kind] for kind in ("Attention", "EmbedLayerNormalization")}
    products = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # not attention's own (activation x activation)
    dynamic = by_type["Attention"] + products + by_type["EmbedLayerNormalization"]
    source, blockwise = src / ONNX_FILE, dst / "blockwise.onnx"
    if scheme == "blockwise":
        others = [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in products]
        source = _blockwise(model, blockwise, others)
        dynamic = by_type["Attention"]
    # Reduced range (7-bit weights): on x86 CPUs without VNNI (AVX2 only) ONNX Runtime's uint8 x int8 kernel adds
    # pairs of products in 16 bits, which 8-bit weights overflow; there the same model gave other answers (reports/results.md,
    # "int8 on CPUs without VNNI"). With |w| <= 64, 2 x 255 x 64 fits, and every CPU computes the same logits.
    # Per-channel scales: with 8-bit weights the sst2-minilm champion lost 0.23 points of dev accuracy against fp32, 0.46 per-tensor.
    # The default tensor type: ONNX shape inference cannot type the outputs of the fused (com.microsoft) operators.
    quantize_dynamic(
        source,
        dst / ONNX_FILE,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        nodes_to_quantize=dynamic,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    blockwise.unlink(missing_ok=True)
    quantized = onnx.load(str(dst / ONNX_FILE))
    mark = quantized.metadata_props.add()
    mark.key, mark.value = ONE_PER_CALL, "true"
    onnx.save(quantized, str(dst / ONNX_FILE))
    return dst


def _blockwise(model: onnx.ModelProto, dst: Path, others: list[str]) -> Path:
    """``model``'s products but ``others`` as 8-bit ``MatMulNBits`` that compute in int8 (accuracy level 4):
    symmetric weights, and activations quantized per block at run time, so that one outlier moves one block's scale, not the whole call's."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    scheme = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, bits=8, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=scheme)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


def build_tensorrt(onnx_file: Path, dst: Path, max_length: int) -> str:
    """A serialized TensorRT engine (fp16 where the GPU has it) when TensorRT is importable; else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "skipped: tensorrt is not importable on this host (a GPU host with TensorRT builds model.plan)"
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KDError(f"TensorRT could not parse {onnx_file.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in ("input_ids", "attention_mask"):
        profile.set_shape(name, (1, 1), (32, 64), (64, max_length))
    config.add_optimization_profile(profile)
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise KDError("TensorRT failed to build an engine from the exported ONNX model (see its log above)")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.plan").write_bytes(bytes(engine))
    return "built"


def run_export(cfg: ExperimentConfig) -> ExportResult:
    ex = cfg.export
    uri = ex.model_uri or registry.champion_uri(registry.student_model_name(cfg))
    with tempfile.TemporaryDirectory(prefix="kd-export-") as tmp:
        work = Path(tmp)
        source = registry.fetch_model(uri, str(work / "source"))
        check_classifier(source)
        split = load_split(cfg.data, cfg.data.eval_split, cfg.data.max_eval_examples)
        folders = {"fp32": export_onnx(source.folder, work / MODELS["fp32"], ex.opset)}
        folders["optimized"], fused = optimize_transformer(folders["fp32"], work / MODELS["optimized"])
        folders["int8"] = quantize_int8(folders["optimized"], work / MODELS["int8"], ex.int8_scheme)
        threads = torch.get_num_threads()
        pytorch = predict_all(TorchBackend(source.folder, source.max_length), split.texts)
        onnx = {kind: predict_all(OrtBackend(folder, source.max_length, threads), split.texts) for kind, folder in folders.items()}
        compared = min(ex.parity_examples, len(split))
        diffs = {kind: float(np.abs(onnx[kind][:compared] - pytorch[:compared]).max()) for kind in ("fp32", "optimized")}
        for kind, diff in diffs.items():
            if diff > ex.tolerance:
                raise KDError(
                    f"export: ONNX Runtime logits of the {kind} graph differ from PyTorch's by up to {diff:.2e} on {compared} sentences, "
                    f"above export.tolerance = {ex.tolerance:g}; nothing was logged"
                )
        max_abs_diff = max(diffs.values())
        tensorrt = build_tensorrt(folders["fp32"] / ONNX_FILE, work / "tensorrt", source.max_length)
        scores = {"pytorch": accuracy(pytorch, split.labels), **{kind: accuracy(logits, split.labels) for kind, logits in onnx.items()}}
        names = label_names(json.loads((folders["fp32"] / "config.json").read_text()))
        tags = {"kd.source_model_uri": uri, "kd.source_run_id": source.run_id or "", "kd.tensorrt": tensorrt}
        if source.registered_name:
            tags |= {"kd.source_model_name": source.registered_name, "kd.source_model_version": source.registered_version}
        with tracking.job_run(cfg.name, registry.Role.EXPORT, tags) as run:
            tracking.log_params(
                {
                    "export.model_uri": uri,
                    "export.opset": ex.opset,
                    "export.tolerance": ex.tolerance,
                    "export.int8_scheme": ex.int8_scheme,
                    "split": cfg.data.eval_split,
                }
            )
            tracking.log_metrics(
                {
                    "max_abs_logit_diff": max_abs_diff,
                    "parity_examples": compared,
                    "pytorch_accuracy": scores["pytorch"],
                    "onnx_fp32_accuracy": scores["fp32"],
                    "onnx_optimized_accuracy": scores["optimized"],
                    "onnx_int8_accuracy": scores["int8"],
                    "int8_accuracy_change_points": 100 * (scores["int8"] - scores["fp32"]),
                    **{f"fused.{op}": n for op, n in fused.items()},
                }
            )
            for kind, folder in folders.items():
                tracking.log_text_classifier(folder, ONNX_MODEL, names, source.max_length, MODELS[kind])
            # The export run's own path names which export a model came from, unlike a models:/m-<id>.
            model_uris = {kind: f"runs:/{run.info.run_id}/{MODELS[kind]}" for kind in folders}
            if tensorrt == "built":
                tracking.log_folder(work / "tensorrt", "tensorrt", "kd.tensorrt_engine")
            registry.set_version_tag(source, "kd.onnx_export_run", run.info.run_id)
    return ExportResult(run.info.run_id, uri, model_uris, max_abs_diff, scores, fused, tensorrt)
