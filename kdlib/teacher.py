"""The teacher job: fine-tune, log, register, promote if better, and cache the teacher's logits."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kdlib import batching, logits_cache, precision, registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.data import load_splits
from kdlib.metrics import classification_metrics
from kdlib.models import SCRATCH, count_parameters, load_classifier
from kdlib.training import fit, make_accelerator, predict_logits, score_evaluation, word_embedding_updates


@dataclass(frozen=True)
class TeacherResult:
    run_id: str
    model_name: str
    version: str
    val_accuracy: float
    eval_accuracy: float
    promoted: bool
    logits_artifact: str


def run_teacher(cfg: ExperimentConfig) -> TeacherResult:
    # Everything that can reject the input happens before the MLflow run opens.
    chosen = precision.resolve(cfg.train.mixed_precision)
    splits = load_splits(cfg.data)
    classifier = load_classifier("teacher", cfg.teacher, cfg.data.label_names, splits.train.texts, cfg.data.max_length, cfg.train.seed)
    updates = word_embedding_updates(classifier.model, cfg.train, scratch=cfg.teacher.name_or_path == SCRATCH)
    train_cfg = replace(cfg.train, word_embeddings=updates)  # resolved here, where it is known whether the model starts from scratch
    print(f"teacher: training in {chosen.mixed_precision} ({chosen.reason}), word embeddings {updates} ({cfg.train.word_embeddings})", flush=True)
    encoded = {
        name: batching.encode(split, classifier.tokenizer, cfg.data.max_length, cfg.cache_dir)
        for name, split in (("train", splits.train), ("validation", splits.validation), ("eval", splits.eval))
    }
    pad = classifier.tokenizer.pad_token_id
    loaders = {name: batching.eval_loader(split, pad, cfg.train.eval_batch_size) for name, split in encoded.items()}
    name = registry.teacher_model_name(cfg)

    with tracking.job_run(cfg.name, registry.Role.TEACHER) as run:
        tracking.log_config(
            cfg,
            ("data", "teacher", "train"),
            {
                **{f"n_{split}": len(split_encoded) for split, split_encoded in encoded.items()},
                "parameters": count_parameters(classifier.model),
                "train.precision": chosen.mixed_precision,
                "train.precision_reason": chosen.reason,
                "train.word_embedding_updates": updates,
            },
        )
        tracking.log_splits(cfg.data.source, splits)
        with tracking.pending_model() as model_id:
            result = fit(
                classifier.model,
                batching.train_loader(encoded["train"], pad, cfg.train.batch_size, cfg.train.seed),
                loaders["validation"],
                lambda logits: classification_metrics(logits, encoded["validation"].labels),
                train_cfg,
                on_epoch_end=lambda epoch, metrics: tracking.log_epoch(epoch, metrics, model_id),
                label="teacher: ",
            )
            classifier.model = result.model
            val_accuracy = result.history[-1][registry.METRIC]
            eval_logits, scores = score_evaluation(
                classifier.model,
                loaders["eval"],
                lambda logits: classification_metrics(logits, encoded["eval"].labels),
                cfg.train.mixed_precision,
                val_accuracy,
            )
            tracking.log_epoch(cfg.train.epochs, scores, model_id)
            # Eval mode (no dropout): these are the soft targets every student trial will read.
            accelerator = make_accelerator(cfg.train.mixed_precision)
            started = time.perf_counter()
            logits = {split: predict_logits(classifier.model, loaders[split], accelerator) for split in ("train", "validation")}
            tracking.log_metrics({logits_cache.SECONDS_METRIC: time.perf_counter() - started})
            logits["eval"] = eval_logits
            model_uri = tracking.log_classifier(classifier, cfg.data.max_length, model_id=model_id)
        what = f"Teacher {cfg.teacher.name_or_path} fine-tuned on {cfg.data.source} ({len(splits.train)} sentences)"
        with registry.registered_version(model_uri, name, **registry.notes(what, val_accuracy, scores[registry.EVAL_METRIC])) as version:
            key = logits_cache.teacher_key(name, version, splits, batching.tokenizer_fingerprint(classifier.tokenizer), cfg.data.max_length)
            with tempfile.TemporaryDirectory() as tmp:
                folder = logits_cache.write(Path(tmp), key, logits)
                artifact = f"{logits_cache.ARTIFACT_DIR}/{folder.name}"
                tracking.log_folder(folder, artifact, logits_cache.TAG)
            promoted = registry.promote_if_better(name, version, val_accuracy)
        return TeacherResult(run.info.run_id, name, version, val_accuracy, scores[registry.EVAL_METRIC], promoted, artifact)
