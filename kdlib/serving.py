"""MLflow pyfunc model that classifies raw strings (an MLflow "model from code" file).

MLflow copies this file into every logged model, so it never imports kdlib: a registered model
loads wherever its backend is installed. Two backends answer the same way:

- ``hf_model`` artifact: a Hugging Face folder run by PyTorch (torch, transformers);
- ``onnx_model`` artifact: ``model.onnx`` with its tokenizer and config, run by ONNX Runtime
  (onnxruntime, transformers for the tokenizer; no torch needed).

Input: a list of strings, a pandas Series, or a DataFrame whose first column holds the text.
Output: a DataFrame with one row per input: ``label`` (the predicted label name), ``score`` (its
probability) and ``prob_<label name>`` for every label (the softmax over all labels).

kdlib's evaluate job times these same backends, so its latency is the served model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel
from transformers import AutoTokenizer

BATCH = 64
HF_MODEL, ONNX_MODEL = "hf_model", "onnx_model"  # artifact keys
ONNX_FILE = "model.onnx"
# ONNX Runtime's SkipLayerNormalization (residual add and LayerNorm in one kernel) took 66 us on one
# 25 x 384 activation where LayerNormalization alone took 11 (Intel Xeon with AMX, onnxruntime 1.32);
# apart, a batch-1 call of the int8 sst2-minilm student took 15% less time. The export leaves them
# apart, and the session must not fuse them again.
UNFUSED = ["SkipLayerNormFusion"]
# Set in a graph's metadata (ONNX metadata_props) where each sentence must run in a call of its own.
# Dynamic int8 quantizes each matrix product's input with one scale for the whole batch, padding
# included, so a sentence's answer would depend on the sentences sent with it: 13 of 872 answers of
# the sst2-minilm int8 student differed between batches of 64 and one sentence per call (reports/results.md,
# "One sentence per call"). On a CPU one per call was as fast as length-sorted batches of 64.
ONE_PER_CALL = "kd.one_sentence_per_call"


def label_names(config: dict) -> list[str]:
    """Label names in id order from a model config's ``id2label`` (a dict, as in config.json)."""
    id2label = {int(k): v for k, v in config["id2label"].items()}
    return [id2label[i] for i in range(len(id2label))]


class Tokenize:
    """Raw strings to (input_ids, attention_mask): int64 arrays, padded on the right, cut at max_length.

    The model's fast tokenizer run by its Rust backend (the ``tokenizers`` library) directly, as the
    transformers call runs it inside, without that call's Python work: 0.042 against 0.081 ms for a
    15-word sentence, in a batch-1 int8 call of about 1.1 ms (reports/results.md).
    """

    def __init__(self, folder: str | Path, max_length: int):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        self.backend = tokenizer.backend_tokenizer
        self.backend.enable_truncation(max_length)
        self.backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # One sentence (batch-1 serving) skips the thread pool that encode_batch hands its work to: 0.025 ms of a 0.9 ms call.
        encodings = [self.backend.encode(texts[0])] if len(texts) == 1 else self.backend.encode_batch(texts)
        return np.array([e.ids for e in encodings], dtype=np.int64), np.array([e.attention_mask for e in encodings], dtype=np.int64)


class TorchBackend:
    """A Hugging Face sequence classifier in PyTorch; ``precision`` "bf16" casts weights and activations."""

    def __init__(self, folder: str | Path, max_length: int, precision: str = "fp32"):
        import torch
        from transformers import AutoModelForSequenceClassification

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenize = Tokenize(folder, max_length)
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        self.model = (model.to(torch.bfloat16) if precision == "bf16" else model).to(self.device).eval()
        self.names = label_names(self.model.config.to_dict())

    def logits(self, texts: list[str]) -> np.ndarray:
        """(len(texts), n_labels) float32 logits of one batch."""
        ids, mask = self.tokenize(texts)
        inputs = {"input_ids": self.torch.from_numpy(ids).to(self.device)}
        # Without padding (always so for one sentence) the mask is all ones and changes nothing, but
        # building it into every layer's attention costs a noticeable share of a batch-1 call.
        if not mask.all():
            inputs["attention_mask"] = self.torch.from_numpy(mask).to(self.device)
        with self.torch.inference_mode():
            out = self.model(**inputs)
        return out.logits.float().cpu().numpy()


class OrtBackend:
    """An exported ``model.onnx`` (inputs input_ids, attention_mask; output logits) in ONNX Runtime."""

    def __init__(self, folder: str | Path, max_length: int, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.threads = threads or 0  # 0: ONNX Runtime's default, one thread per physical core
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), options, providers=providers, disabled_optimizers=UNFUSED)
        self.one_per_call = self.session.get_modelmeta().custom_metadata_map.get(ONE_PER_CALL) == "true"
        self.tokenize = Tokenize(folder, max_length)
        self.names = label_names(json.loads((folder / "config.json").read_text()))

    def logits(self, texts: list[str]) -> np.ndarray:
        if self.one_per_call and len(texts) > 1:
            return np.concatenate([self.logits([text]) for text in texts])
        ids, mask = self.tokenize(texts)
        return self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TextClassifier(PythonModel):
    def load_context(self, context) -> None:
        max_length = int(context.model_config["max_length"])  # every logged model records it
        if ONNX_MODEL in context.artifacts:
            self.backend = OrtBackend(context.artifacts[ONNX_MODEL], max_length)
        else:
            self.backend = TorchBackend(context.artifacts[HF_MODEL], max_length)

    @staticmethod
    def _texts(model_input) -> list[str]:
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.iloc[:, 0]
        if isinstance(model_input, str):
            model_input = [model_input]
        return [str(text) for text in list(model_input)]

    # MLflow enforces the logged signature first, so strings arrive as a one-column DataFrame.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        texts = self._texts(model_input)
        names = self.backend.names
        chunks = [softmax(self.backend.logits(texts[start : start + BATCH])) for start in range(0, len(texts), BATCH)]
        p = np.concatenate(chunks) if chunks else np.empty((0, len(names)))
        best = p.argmax(-1)
        frame = pd.DataFrame({"label": [names[i] for i in best], "score": p.max(-1).astype(np.float64)})
        for i, name in enumerate(names):
            frame[f"prob_{name}"] = p[:, i].astype(np.float64)
        return frame


mlflow.models.set_model(TextClassifier())
