"""MLflow pyfunc model that classifies raw strings (an MLflow "model from code" file).

MLflow copies this file into every logged model, so it imports only torch, transformers and
pandas, never kdlib: a registered model loads wherever those are installed.

Input: a list of strings, a pandas Series, or a DataFrame whose first column holds the text.
Output: a DataFrame with one row per input: ``label`` (the predicted label name), ``score`` (its
probability) and ``prob_<label name>`` for every label (the softmax over all labels).
"""

from __future__ import annotations

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

BATCH = 64


class TextClassifier(PythonModel):
    def load_context(self, context) -> None:
        path = context.artifacts["hf_model"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        self.max_length = int(context.model_config.get("max_length", 128))
        config = self.model.config
        self.names = [config.id2label[i] for i in range(config.num_labels)]

    @staticmethod
    def _texts(model_input) -> list[str]:
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.iloc[:, 0]
        if isinstance(model_input, str):
            model_input = [model_input]
        return [str(text) for text in list(model_input)]

    @torch.no_grad()
    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        texts = self._texts(model_input)
        probs = []
        for start in range(0, len(texts), BATCH):
            batch = self.tokenizer(texts[start : start + BATCH], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            probs.append(self.model(**batch).logits.float().softmax(-1).cpu())
        p = torch.cat(probs) if probs else torch.empty((0, len(self.names)))
        best = p.argmax(-1)
        frame = pd.DataFrame({"label": [self.names[i] for i in best.tolist()], "score": p.max(-1).values.double().numpy()})
        for i, name in enumerate(self.names):
            frame[f"prob_{name}"] = p[:, i].double().numpy()
        return frame


mlflow.models.set_model(TextClassifier())
