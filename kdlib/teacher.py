"""The teacher job: fine-tune, log, register, promote if better, and cache the teacher's logits."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from kdlib import batching, logits_cache, precision, registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.data import load_splits
from kdlib.metrics import classification_metrics
from kdlib.models import count_parameters, load_classifier
from kdlib.training import fit, make_accelerator, predict_logits


@dataclass(frozen=True)
class TeacherResult:
    run_id: str
    model_name: str
    version: str
    dev_accuracy: float
    promoted: bool
    logits_artifact: str


def run_teacher(cfg: ExperimentConfig) -> TeacherResult:
    # Everything that can reject the input happens before the MLflow run opens.
    chosen = precision.resolve(cfg.train.mixed_precision)
    print(f"teacher: training in {chosen.mixed_precision} ({chosen.reason})", flush=True)
    splits = load_splits(cfg.data)
    classifier = load_classifier("teacher", cfg.teacher, cfg.data.label_names, splits.train.texts, cfg.data.max_length, cfg.train.seed)
    train = batching.encode(splits.train, classifier.tokenizer, cfg.data.max_length, cfg.cache_dir)
    dev = batching.encode(splits.eval, classifier.tokenizer, cfg.data.max_length, cfg.cache_dir)
    pad = classifier.tokenizer.pad_token_id
    name = registry.teacher_model_name(cfg)

    with tracking.job_run(cfg.name, registry.Role.TEACHER) as run:
        tracking.log_config(
            cfg,
            ("data", "teacher", "train"),
            {
                "n_train": len(train),
                "n_dev": len(dev),
                "train_fingerprint": splits.train.fingerprint,
                "dev_fingerprint": splits.eval.fingerprint,
                "parameters": count_parameters(classifier.model),
                "train.precision": chosen.mixed_precision,
                "train.precision_reason": chosen.reason,
            },
        )
        tracking.log_splits(cfg.data.source, splits)
        with tracking.pending_model() as model_id:
            result = fit(
                classifier.model,
                batching.train_loader(train, pad, cfg.train.batch_size, cfg.train.seed),
                batching.eval_loader(dev, pad, cfg.train.eval_batch_size),
                lambda logits: classification_metrics(logits, dev.labels),
                cfg.train,
                on_epoch_end=lambda epoch, metrics: tracking.log_epoch(epoch, metrics, model_id),
                label="teacher: ",
            )
            classifier.model = result.model
            dev_accuracy = result.history[-1][registry.METRIC]
            # Eval mode (no dropout): these are the soft targets every student trial will read.
            accelerator = make_accelerator(cfg.train.mixed_precision)
            train_logits = predict_logits(classifier.model, batching.eval_loader(train, pad, cfg.train.eval_batch_size), accelerator)
            dev_logits = predict_logits(classifier.model, batching.eval_loader(dev, pad, cfg.train.eval_batch_size), accelerator)
            model_uri = tracking.log_classifier(classifier, cfg.data.max_length, model_id=model_id)
        what = f"Teacher {cfg.teacher.name_or_path} fine-tuned on {cfg.data.source} ({len(train)} sentences)"
        with registry.registered_version(model_uri, name, **registry.notes(what, dev_accuracy)) as version:
            key = logits_cache.LogitsKey(
                name,
                version,
                splits.train.fingerprint,
                splits.eval.fingerprint,
                batching.tokenizer_fingerprint(classifier.tokenizer),
                cfg.data.max_length,
            )
            with tempfile.TemporaryDirectory() as tmp:
                folder = logits_cache.write(Path(tmp), key, train_logits, dev_logits)
                artifact = f"{logits_cache.ARTIFACT_DIR}/{folder.name}"
                tracking.log_folder(folder, artifact, logits_cache.TAG)
            promoted = registry.promote_if_better(name, version, dev_accuracy)
        return TeacherResult(run.info.run_id, name, version, dev_accuracy, promoted, artifact)
