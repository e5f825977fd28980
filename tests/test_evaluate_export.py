"""Evaluate and export on the swept smoke store: real metrics, ONNX parity, int8, pyfunc, bad input."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from onnx import numpy_helper
from transformers import BertConfig, BertForMaskedLM

from kdlib import registry, tracking
from kdlib.config import INT8_SCHEMES
from kdlib.data import load_split
from kdlib.errors import KDError
from kdlib.evaluate import run_evaluate
from kdlib.export import quantize_int8, run_export
from kdlib.metrics import accuracy
from kdlib.models import train_wordpiece
from kdlib.serving import HF_MODEL, ONNX_FILE, OrtBackend
from search.benchmarks import cpu_parity, serve_latency
from search.benchmarks.bench import OUT
from tests.conftest import SMOKE, in_store, mlflow_run, swept_config, unavailable

STUDENT = "models:/smoke-student@champion"
TEACHER = "models:/smoke-teacher@champion"


def labels_from_pyfunc(uri: str, texts: list[str]) -> np.ndarray:
    frame = mlflow.pyfunc.load_model(uri).predict(texts)
    return frame["label"].map({"negative": 0, "positive": 1}).to_numpy()


def runs_of(experiment: str = "smoke"):
    client = MlflowClient()
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "")


@pytest.fixture(scope="module")
def exported(swept_store):
    """One export of the champion student, shared by the tests that read it."""
    with in_store(swept_store):
        return run_export(swept_config())


def test_evaluate_measures_accuracy_agreement_and_latency_of_the_champion(in_swept):
    cfg = swept_config("evaluate.latency_calls=20", "evaluate.throughput_batches=3")
    result = run_evaluate(cfg)
    dev = load_split(cfg.data, "validation", 200)
    student, teacher = labels_from_pyfunc(STUDENT, dev.texts), labels_from_pyfunc(TEACHER, dev.texts)
    assert result.accuracy == pytest.approx(float((student == dev.labels).mean()))
    assert result.agreement == pytest.approx(float((student == teacher).mean()))
    assert result.n_examples == 200 and result.backend == "pytorch fp32"
    assert 0 < result.latency.batch1_p50_ms <= result.latency.batch1_p95_ms and result.latency.throughput > 0
    assert result.latency.threads == torch.get_num_threads()
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kd.model_uri"] == STUDENT
    assert run.data.metrics["accuracy"] == pytest.approx(result.accuracy)
    assert run.data.metrics["latency_batch1_p50_ms"] == pytest.approx(result.latency.batch1_p50_ms)
    assert run.data.metrics["throughput_batch32_per_s"] == pytest.approx(result.latency.throughput)
    assert run.data.params["split"] == "validation" and run.data.params["evaluate.model_uri"] == STUDENT
    assert run.data.metrics["parameters"] == sum(
        p.numel() for p in mlflow.pyfunc.load_model(STUDENT).unwrap_python_model().backend.model.parameters()
    )


def test_evaluate_bf16_and_the_teacher_itself(in_swept):
    bf16 = run_evaluate(swept_config("evaluate.precision=bf16", "evaluate.latency_calls=5", "evaluate.throughput_batches=1"))
    assert bf16.backend == "pytorch bf16" and 0.5 < bf16.accuracy <= 1
    teacher = run_evaluate(swept_config(f"evaluate.model_uri={TEACHER}", "evaluate.latency_calls=5", "evaluate.throughput_batches=1"))
    assert teacher.agreement == 1.0


def test_export_reproduces_pytorch_and_serves_raw_strings(in_swept, exported):
    assert exported.max_abs_diff <= 1e-4
    assert exported.accuracy["fp32"] == exported.accuracy["pytorch"] == exported.accuracy["optimized"]
    assert abs(exported.accuracy["int8"] - exported.accuracy["fp32"]) <= 0.05
    # ONNX Runtime's fusions took hold of the BERT graph: attention, LayerNorms, GELU; residual adds stay apart.
    assert {"Attention", "LayerNormalization", "BiasGelu"} <= set(exported.fused), exported.fused
    assert "SkipLayerNormalization" not in exported.fused
    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load(str(Path(registry.fetch_model(exported.model_uris["fp32"], tmp).folder) / ONNX_FILE))
    graph = model.graph
    assert "GatherElements" not in {node.op_type for node in graph.node}  # token type ids passed in, not gathered from BERT's buffer
    # The last layer's feed-forward block runs on the first token alone (the classifier reads no other).
    *_, ffn = [node for node in graph.node if node.name.endswith("/intermediate/dense/MatMul")]
    graph.output.append(onnx.helper.make_tensor_value_info(ffn.output[0], onnx.TensorProto.FLOAT, None))
    ids = np.array([[2, 5, 6, 7, 8, 3]], dtype=np.int64)
    hidden = ort.InferenceSession(model.SerializeToString()).run([ffn.output[0]], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert hidden.shape[:2] == (1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        int8 = onnx.load(str(Path(registry.fetch_model(exported.model_uris["int8"], tmp).folder) / ONNX_FILE))
    weights = [numpy_helper.to_array(t) for t in int8.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    # uint8 activations times these weights, summed in pairs, fit 16 bits: the kernel of CPUs without VNNI cannot overflow.
    assert weights and 2 * 255 * max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= np.iinfo(np.int16).max
    texts = load_split(swept_config().data, "validation", 200).texts
    assert (labels_from_pyfunc(exported.model_uris["fp32"], texts) == labels_from_pyfunc(STUDENT, texts)).all()
    assert (labels_from_pyfunc(exported.model_uris["optimized"], texts) == labels_from_pyfunc(STUDENT, texts)).all()
    served = mlflow.pyfunc.load_model(exported.model_uris["int8"])
    frame = served.predict(["a gorgeous, witty film", "a dull mess"])
    assert list(frame.columns) == ["label", "score", "prob_negative", "prob_positive"] and len(frame) == 2
    np.testing.assert_allclose(frame["prob_negative"] + frame["prob_positive"], 1.0, rtol=1e-6)
    # A sentence's answer does not depend on the sentences sent with it: dynamic int8 scales each call's input as a whole.
    together = served.predict(texts[:40])
    pd.testing.assert_frame_equal(together, pd.concat([served.predict([text]) for text in texts[:40]], ignore_index=True))

    client = MlflowClient()
    run = client.get_run(exported.run_id)
    champion = client.get_model_version_by_alias("smoke-student", "champion")
    assert run.data.tags["kd.source_model_name"] == "smoke-student" and run.data.tags["kd.source_model_version"] == str(champion.version)
    assert champion.tags["kd.onnx_export_run"] == exported.run_id
    assert run.data.metrics["max_abs_logit_diff"] == pytest.approx(exported.max_abs_diff)
    assert run.data.metrics["onnx_int8_accuracy"] == pytest.approx(exported.accuracy["int8"])
    assert run.data.params["export.int8_scheme"] == "dynamic"
    assert run.data.metrics["fused.Attention"] == exported.fused["Attention"] >= 1
    if exported.tensorrt != "built":
        assert run.data.tags["kd.tensorrt"].startswith("skipped: tensorrt is not importable")


def test_blockwise_int8_keeps_closer_to_fp32_than_dynamic(in_swept, exported, tmp_path):
    """The blockwise scheme: the encoder's products as 8-bit MatMulNBits, attention dynamic, embeddings and
    head fp32; its logits stay nearer the fp32 graph's than the dynamic export's do."""
    folders = {kind: registry.fetch_model(exported.model_uris[kind], str(tmp_path / kind)).folder for kind in ("optimized", "int8")}
    products = [n for n in onnx.load(str(folders["optimized"] / ONNX_FILE)).graph.node if n.op_type == "MatMul" and "dense" in n.name]
    blockwise = quantize_int8(folders["optimized"], tmp_path / "blockwise", "blockwise")
    assert sorted(p.name for p in blockwise.iterdir()) == sorted(p.name for p in folders["optimized"].iterdir())  # nothing left over
    ops = Counter(n.op_type for n in onnx.load(str(blockwise / ONNX_FILE)).graph.node)
    assert ops["MatMulNBits"] == len(products) and ops["QAttention"] == exported.fused["Attention"]
    assert ops["EmbedLayerNormalization"] == 1 and not ops["MatMulInteger"]  # embeddings and head in fp32
    texts = load_split(swept_config().data, "validation", 200).texts
    logits = {
        kind: OrtBackend(folder, swept_config().data.max_length, 1).logits(texts) for kind, folder in [*folders.items(), ("blockwise", blockwise)]
    }
    apart = {kind: float(np.abs(logits[kind] - logits["optimized"]).mean()) for kind in ("int8", "blockwise")}
    assert 0 < apart["blockwise"] < apart["int8"], apart


def test_evaluate_an_exported_onnx_model(in_swept, exported):
    result = run_evaluate(
        swept_config(f"evaluate.model_uri={exported.model_uris['int8']}", "evaluate.latency_calls=5", "evaluate.throughput_batches=1")
    )
    assert result.backend == "onnxruntime" and result.accuracy == pytest.approx(exported.accuracy["int8"])
    with pytest.raises(KDError, match="evaluate.precision = 'bf16' applies to PyTorch models"):
        run_evaluate(swept_config(f"evaluate.model_uri={exported.model_uris['fp32']}", "evaluate.precision=bf16"))
    with pytest.raises(KDError, match="is already an ONNX model"):
        run_export(swept_config(f"export.model_uri={exported.model_uris['fp32']}"))


def _log_masked_lm() -> str:
    """A logged model in this project's format whose network is a masked LM, not a classifier."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / HF_MODEL
        BertForMaskedLM(BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(
            path
        )
        train_wordpiece(["a tiny corpus", "for a tiny tokenizer"], 120).save_pretrained(path)
        mlflow.set_experiment("not-a-classifier")
        with mlflow.start_run():
            uri = tracking.log_text_classifier(path, HF_MODEL, ["negative", "positive"], 32, "model")
    return uri


@pytest.mark.parametrize(
    "job, overrides, message",
    [
        (
            run_evaluate,
            ["evaluate.model_uri=models:/nope@champion"],
            "model_uri 'models:/nope@champion' not found in the MLflow store .*Registered Model with name=nope not found",
        ),
        (run_evaluate, ["evaluate.model_uri=models:/smoke-student/99"], "not found .*Model Version .*version=99.* not found"),
        (run_export, ["export.model_uri=smoke-student"], "'smoke-student' is not a model URI; expected models:/<name>@<alias>"),
        (run_evaluate, ["evaluate.split=nosuch"], "data: builtin:sentiment has no split 'nosuch'"),
        (run_evaluate, ["evaluate.teacher_uri=models:/nope/1"], "model_uri 'models:/nope/1' not found"),
    ],
)
def test_bad_input_one_message_and_no_run(in_swept, job, overrides, message):
    before = len(runs_of())
    with pytest.raises(KDError, match=message):
        job(swept_config(*overrides))
    assert len(runs_of()) == before and mlflow.active_run() is None


def test_run_without_a_model_and_models_of_other_kinds(in_swept):
    teacher_run = MlflowClient().get_model_version_by_alias("smoke-teacher", "champion").run_id
    before = len(runs_of())
    for uri in (f"runs:/{teacher_run}/no_such_model", f"runs:/{teacher_run}"):
        with pytest.raises(KDError, match=f"model_uri '{uri}' not found .*that run has no model there"):
            run_evaluate(swept_config(f"evaluate.model_uri={uri}"))
    with pytest.raises(KDError, match="holds BertForMaskedLM, not a sequence classifier"):
        run_export(swept_config(f"export.model_uri={_log_masked_lm()}"))

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    with mlflow.start_run():
        foreign = mlflow.pyfunc.log_model(name="model", python_model=Echo()).model_uri
    with pytest.raises(KDError, match="is not a text classifier of this project"):
        run_export(swept_config(f"export.model_uri={foreign}"))
    assert len(runs_of()) == before


@pytest.mark.e2e
def test_mlflow_run_export_and_evaluate_as_documented(in_swept):
    done = mlflow_run(in_swept, "export", f"model_uri={STUDENT}", "data.max_eval_examples=200")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TensorRT:" in done.stdout
    # named as the project names it: GLUE's validation split is this experiment's evaluation split
    assert "evaluation split (validation) accuracy: PyTorch" in done.stdout
    int8 = re.search(r"ONNX int8: mlflow\.pyfunc\.load_model\('(runs:/\w+/onnx_int8)'\)", done.stdout).group(1)
    done = mlflow_run(in_swept, "evaluate", f"model_uri={int8}", "data.max_eval_examples=200", "evaluate.latency_calls=5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"| {int8} | onnxruntime | validation (200) |" in done.stdout
    done = mlflow_run(in_swept, "evaluate", f"model_uri={STUDENT}", "data.max_eval_examples=200", "evaluate.latency_calls=5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| models:/smoke-student@champion | pytorch fp32 | validation (200) |" in done.stdout
    bad = mlflow_run(in_swept, "evaluate", "model_uri=models:/nope@champion")
    assert bad.returncode != 0
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        f"error: model_uri 'models:/nope@champion' not found in the MLflow store {mlflow.get_tracking_uri()}: "
        "Registered Model with name=nope not found; expected models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<model name>"
    ]


def test_serve_latency_times_every_model_on_the_same_sentences_in_turns(in_swept, exported, capsys):
    assert serve_latency.turns(calls=5, warmup=2, block=2) == [(0, 2), (0, 2), (2, 2), (4, 1)]
    int8 = exported.model_uris["int8"]
    # The int8 model twice: two processes, two rows (their spread is the host's noise).
    serve_latency.main(["--experiment", str(SMOKE), "--calls", "5", "--block", "2", STUDENT, int8, int8])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith(("| models:", "| runs:"))]
    assert [(row[0][2:], row[1]) for row in rows] == [(STUDENT, "5"), (int8, "5"), (int8, "5")]
    assert all(float(row[2]) > 0 for row in rows) and rows[0][4] == "1.00 |"


def needs_qemu() -> None:
    if shutil.which(cpu_parity.QEMU) is None:
        unavailable(f"{cpu_parity.QEMU} is not installed (apt-get install qemu-user; .ci/run does)")


def test_cpu_parity_scores_the_model_on_emulated_cpus_as_served(in_swept, exported, capsys, tmp_path):
    needs_qemu()
    int8 = exported.model_uris["int8"]
    assert cpu_parity.main(["--experiment", str(SMOKE), "--sentences", "12", int8]) == 0
    results = json.loads((OUT / "smoke-cpu-parity.json").read_text())
    assert cpu_parity.markdown(results) in capsys.readouterr().out
    # The emulated CPUs' kernels ran, not this host's: ONNX Runtime and NumPy read the same CPUID.
    rome, nehalem = (results["cpus"][cpu]["features"] for cpu in cpu_parity.CPUS)
    assert "AVX2" in rome and "AVX512F" not in rome and "AVX512VNNI" not in rome
    assert "SSE42" in nehalem and "AVX" not in nehalem
    assert results["cpus"]["EPYC-Rome"]["answers_differ"] == 0
    # Here, the script's logits are the served backend's, sentence by sentence.
    cfg = swept_config()
    split = load_split(cfg.data, cfg.data.eval_split, 12)
    source = registry.fetch_model(int8, str(tmp_path / "model"))
    ids, lengths = cpu_parity.tokens(source.folder, source.max_length, split.texts)
    np.savez(tmp_path / "tokens.npz", ids=ids, lengths=lengths)
    here, _ = cpu_parity.scored(source.folder / ONNX_FILE, tmp_path / "tokens.npz", tmp_path / "here.npz", [])
    served = OrtBackend(source.folder, source.max_length)
    assert np.array_equal(here, np.concatenate([served.logits([text]) for text in split.texts]))
    assert results["cpus"]["EPYC-Rome"]["accuracy_here"] == accuracy(here, split.labels)


def _saturating_graph(folder: Path, hidden: int = 64) -> Path:
    """input_ids -> embeddings of ones, times the mask, averaged -> MatMul with weights of ones -> logits.
    Quantized, every activation is 255 and every 8-bit weight 127: a pair of products, 64,770, is past
    what the 16-bit adds of a CPU without VNNI hold (32,767)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["embedded"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "last"], ["mask_3d"]),
        helper.make_node("Mul", ["embedded", "mask_3d"], ["masked"]),
        helper.make_node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "classifier"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(np.ones((100, hidden), np.float32), "embeddings"),
        numpy_helper.from_array(np.ones((hidden, 2), np.float32), "classifier"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    graph = helper.make_graph(
        nodes,
        "saturating",
        [helper.make_tensor_value_info(name, TensorProto.INT64, [1, "length"]) for name in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        initializers,
    )
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / ONNX_FILE))
    return folder


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_the_int8_export_gives_the_same_logits_on_a_cpu_without_vnni(scheme, tmp_path):
    needs_qemu()
    int8 = quantize_int8(_saturating_graph(tmp_path / "fp32"), tmp_path / "int8", scheme) / ONNX_FILE
    np.savez(tmp_path / "tokens.npz", ids=np.array([[1, 2, 3, 4]]), lengths=np.array([4]))
    here, _ = cpu_parity.scored(int8, tmp_path / "tokens.npz", tmp_path / "here.npz", [])
    there, seen = cpu_parity.scored(int8, tmp_path / "tokens.npz", tmp_path / "there.npz", [cpu_parity.QEMU, "-cpu", "EPYC-Rome"])
    assert "AVX2" in seen and "AVX512VNNI" not in seen
    assert np.allclose(here, 64.0, rtol=0.02)  # the mean of ones through weights of ones, to int8's precision
    assert np.abs(there - here).max() < 1e-5


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--qemu", "no-such-emulator"], "no-such-emulator not found; expected QEMU's user-mode emulator on the PATH"),
        (["--cpu", "Pentium9000"], "--cpu Pentium9000: not a CPU model of qemu-x86_64"),
        ([STUDENT], "is a PyTorch model; expected an ONNX model of the export job"),
    ],
)
def test_cpu_parity_refuses_what_it_cannot_run(in_swept, arguments, message, capsys):
    if "--qemu" not in arguments:
        needs_qemu()
    uri = [] if STUDENT in arguments else ["runs:/0123/onnx_int8"]
    assert cpu_parity.main(["--experiment", str(SMOKE), *uri, *arguments]) == 2
    assert message in capsys.readouterr().err
