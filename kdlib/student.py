"""Distil one student from the cached teacher logits, inside a run its caller opened.

``prepare`` does the work every trial shares (data, the teacher's cached logits, the teacher's
weights when the student is cut from them, tokenization) once; ``train_student`` builds a fresh
student and trains it with the KD loss, on the training split and, when ``distill.transfer`` asks
for one, on the teacher-labelled transfer set; ``log_student_run`` does that in the caller's MLflow
run (the distill job's, or a sweep trial's). The teacher never runs during student training: it
only labels a transfer set, once per set of settings, and the set is cached on its run.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from kdlib import batching, logits_cache, precision, registry, tracking, transfer
from kdlib.config import ExperimentConfig, ModelConfig, TransferConfig
from kdlib.data import Splits, load_splits, load_unlabelled
from kdlib.errors import KDError
from kdlib.losses import kd_loss
from kdlib.metrics import agreement, classification_metrics
from kdlib.models import SCRATCH, Classifier, count_parameters, cut_from_teacher, load_classifier
from kdlib.training import EpochCallback, FitResult, fit, make_accelerator, predict_logits, score_evaluation, word_embedding_updates

SPLITS = ("train", "validation", "eval")
EVAL_LOGITS = "predictions/eval_logits.npy"  # every finished student's evaluation-split logits, for paired comparisons


@dataclass(frozen=True)
class TransferData:
    encoded: batching.Encoded  # the copies as the student's tokenizer reads them
    logits: np.ndarray  # the teacher's, [n, labels]
    info: dict


@dataclass
class StudentData:
    splits: Splits
    teacher_name: str
    teacher_version: str
    teacher_run_id: str
    teacher_logits: dict[str, np.ndarray]  # split -> [n, labels], eval-mode teacher
    template: Classifier  # the untrained student every trial starts from (copied, never trained)
    encoded: dict[str, batching.Encoded]  # split -> the student's token ids
    workdir: str  # outlives every trial of this process: the teacher's files are read from here
    teacher: Classifier | None = None  # loaded when the student is cut from it or a transfer set is labelled
    transfers: dict[TransferConfig, TransferData] = field(default_factory=dict)  # per transfer setting, made or fetched once


def fetch_teacher(cfg: ExperimentConfig, name: str, version: str, workdir: str) -> Classifier:
    """Version ``version`` of the registered teacher ``name``, downloaded into ``workdir`` and loaded."""
    folder = registry.fetch_model(f"models:/{name}/{version}", workdir).folder
    return load_classifier("teacher", ModelConfig(name_or_path=str(folder)), cfg.data.label_names, [], cfg.data.max_length, cfg.distill.train.seed)


def embedding_updates(cfg: ExperimentConfig, model: torch.nn.Module) -> str:
    """How the student's word-embedding table trains (``cfg.distill.train.word_embeddings`` resolved);
    a student cut from the teacher starts from the teacher's trained table, not from scratch."""
    scratch = cfg.student.name_or_path == SCRATCH and not cfg.student.teacher_layers
    return word_embedding_updates(model, cfg.distill.train, scratch=scratch)


def prepare(cfg: ExperimentConfig, workdir: str) -> StudentData:
    """Load data, the champion teacher's logits and the initial student; refuse mismatched logits."""
    chosen = precision.resolve(cfg.distill.train.mixed_precision)
    splits = load_splits(cfg.data)
    name = registry.teacher_model_name(cfg)
    hint = f"run the teacher entry point first: mlflow run . -e teacher --env-manager local -P experiment=<this experiment file> (experiment name {cfg.name!r})"
    version = registry.champion_version(name, hint)
    artifact = tracking.run_tag(version.run_id, logits_cache.TAG)
    if not artifact:
        raise KDError(f"teacher {name} version {version.version} (run {version.run_id}) has no cached logits; rerun the teacher entry point")
    folder = tracking.download_run_artifact(version.run_id, artifact, workdir)
    logits, _ = logits_cache.read(
        folder,
        logits_cache.teacher_key(name, version.version, splits),
        "teacher logits cache",
        "rerun the teacher entry point on this data (same data.source, splits, validation settings and max_*_examples)",
    )
    teacher = fetch_teacher(cfg, name, str(version.version), workdir) if cfg.student.teacher_layers else None
    if teacher is not None:
        template = cut_from_teacher(teacher, cfg.student.teacher_layers)
    else:
        template = load_classifier("student", cfg.student, cfg.data.label_names, splits.train.texts, cfg.data.max_length, cfg.distill.train.seed)
    updates = embedding_updates(cfg, template.model)
    print(
        f"students: training in {chosen.mixed_precision} ({chosen.reason}), word embeddings {updates} ({cfg.distill.train.word_embeddings})",
        flush=True,
    )
    encoded = {split: batching.encode(getattr(splits, split), template.tokenizer, cfg.data.max_length, cfg.cache_dir) for split in SPLITS}
    data = StudentData(splits, name, str(version.version), version.run_id, logits, template, encoded, workdir, teacher)
    transfer_data(cfg, data)  # made (or fetched) once here, before any trial or second worker needs it
    return data


def transfer_data(cfg: ExperimentConfig, data: StudentData) -> TransferData | None:
    """The transfer set of ``cfg.distill.transfer`` as this student reads it (None when it has none);
    fetched from the teacher's run, or made, labelled and stored there on first use."""
    settings = cfg.distill.transfer
    if not settings.enabled:
        return None
    if settings not in data.transfers:
        split = settings.unlabelled_split
        unlabelled = load_unlabelled(cfg.data, split, data.splits, settings.unlabelled_max, settings.seed) if split else []
        set_key = transfer.key(data.teacher_name, data.teacher_version, data.splits.train.fingerprint, settings, cfg.data.max_length, unlabelled)

        def make() -> transfer.TransferSet:
            if data.teacher is None:
                data.teacher = fetch_teacher(cfg, data.teacher_name, data.teacher_version, data.workdir)
            teacher = data.teacher
            accelerator = make_accelerator(cfg.train.mixed_precision)  # the teacher's own precision

            def label(texts: list[str]) -> np.ndarray:
                encoded = batching.encode(transfer.as_split(texts, teacher.tokenizer), teacher.tokenizer, cfg.data.max_length, cfg.cache_dir)
                loader = batching.eval_loader(encoded, teacher.tokenizer.pad_token_id, cfg.train.eval_batch_size)
                return predict_logits(teacher.model, loader, accelerator)

            print(
                f"students: labelling a transfer set of {settings.copies} copies per sentence and {len(unlabelled)} unlabelled sentences with the teacher",
                flush=True,
            )
            return transfer.make(settings, data.splits.train, unlabelled, teacher, label)

        made = _cached_transfer_set(data.teacher_run_id, set_key, data.workdir, make)
        encoded = batching.encode(transfer.as_split(made.texts, data.template.tokenizer), data.template.tokenizer, cfg.data.max_length, cfg.cache_dir)
        data.transfers[settings] = TransferData(encoded, made.logits, made.info)
    return data.transfers[settings]


def _cached_transfer_set(teacher_run_id: str, set_key: dict, workdir: str, make: Callable[[], transfer.TransferSet]) -> transfer.TransferSet:
    """The transfer set stored under ``set_key`` on the teacher's run; made with ``make()`` and stored
    there first if there is none. Sets are deterministic, so two workers making one at once write
    the same files."""
    path = f"{transfer.ARTIFACT_DIR}/{logits_cache.digest(set_key)}"
    if not tracking.artifact_exists(teacher_run_id, path):
        made = make()
        with tempfile.TemporaryDirectory() as tmp:
            texts = np.asarray(made.texts, dtype=np.str_)
            folder = logits_cache.write(Path(tmp), set_key, {"texts": texts, "logits": made.logits}, made.info)
            tracking.log_folder_to(teacher_run_id, folder, path)
        return transfer.TransferSet(made.texts, made.logits, {**made.info, "digest": folder.name})
    hint = "delete that artifact of the teacher's run, or change distill.transfer.seed, to make a new one"
    arrays, info = logits_cache.read(tracking.download_run_artifact(teacher_run_id, path, workdir), set_key, "transfer-set cache", hint)
    # A set cached before unlabelled sentences existed holds copies only and does not count them apart.
    counts = {"copies": info.get("examples", len(arrays["texts"])), "unlabelled": 0}
    return transfer.TransferSet(arrays["texts"].tolist(), arrays["logits"], {**counts, **info, "digest": path.rpartition("/")[2]})


def student_metrics(logits: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray) -> dict[str, float]:
    """Accuracy and loss on the labels, and agreement: the share of examples where student and teacher predict the same label."""
    return {**classification_metrics(logits, labels), "agreement": agreement(logits, teacher_logits)}


@dataclass(frozen=True)
class TrainedStudent:
    student: Classifier
    fit: FitResult
    eval_logits: np.ndarray  # [n_eval, labels]
    eval_metrics: dict[str, float]  # eval_accuracy, eval_loss, eval_agreement, val_eval_gap


def train_student(cfg: ExperimentConfig, data: StudentData, on_epoch_end: EpochCallback | None = None, label: str = "student: ") -> TrainedStudent:
    """A fresh copy of the initial student, trained with the KD loss at ``cfg.distill``'s settings,
    chosen on validation, then scored once on the evaluation split."""
    distill, train_cfg = cfg.distill, replace(cfg.distill.train, word_embeddings=embedding_updates(cfg, data.template.model))
    train, targets = data.encoded["train"], data.teacher_logits["train"]
    extra = transfer_data(cfg, data)
    if extra is not None:
        train, targets = batching.concat(train, extra.encoded), np.concatenate([targets, extra.logits])
    teacher_logits = torch.from_numpy(targets)

    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]):
        # Soft targets for exactly this batch's examples: [batch, labels], gathered by example index.
        soft = teacher_logits[batch["index"].cpu()].to(logits.device)
        loss, kl, ce = kd_loss(logits, soft, batch["labels"], distill.temperature, distill.alpha)
        return loss, {"kd_loss": kl, "ce_loss": ce}

    def scorer(split: str):
        return lambda logits: student_metrics(logits, data.encoded[split].labels, data.teacher_logits[split])

    student = Classifier(data.template.tokenizer, copy.deepcopy(data.template.model))
    pad = student.tokenizer.pad_token_id
    result = fit(
        student.model,
        batching.train_loader(train, pad, train_cfg.batch_size, train_cfg.seed),
        batching.eval_loader(data.encoded["validation"], pad, train_cfg.eval_batch_size),
        scorer("validation"),
        train_cfg,
        loss_fn=loss_fn,
        on_epoch_end=on_epoch_end,
        label=label,
    )
    student.model = result.model
    eval_logits, scores = score_evaluation(
        student.model,
        batching.eval_loader(data.encoded["eval"], pad, train_cfg.eval_batch_size),
        scorer("eval"),
        train_cfg.mixed_precision,
        result.history[-1][registry.METRIC],
    )
    return TrainedStudent(student, result, eval_logits, scores)


@dataclass(frozen=True)
class StudentResult:
    run_id: str
    val_accuracy: float
    eval_accuracy: float
    model_uri: str
    eval_logits: np.ndarray


def log_student_run(cfg: ExperimentConfig, data: StudentData, on_epoch_end: EpochCallback | None = None, label: str = "student: ") -> StudentResult:
    """Inside an open MLflow run: log the student's settings, train it, log per-epoch metrics, the
    evaluation-split scores and logits, and the model.

    ``on_epoch_end`` runs after each epoch's metrics are logged (a sweep trial reports and prunes there).
    """
    extra = transfer_data(cfg, data)
    tracking.log_config(
        cfg,
        ("data", "student", "distill"),  # the teacher's settings are its own run's
        {
            "teacher_version": data.teacher_version,
            "teacher_run_id": data.teacher_run_id,
            **{f"n_{split}": len(data.encoded[split]) for split in SPLITS},
            "parameters": count_parameters(data.template.model),
            "non_embedding_parameters": count_parameters(data.template.model, embeddings=False),
            "train_tokens": int(data.encoded["train"].lengths.sum() + (extra.encoded.lengths.sum() if extra else 0)),
            "distill.train.precision": precision.resolve(cfg.distill.train.mixed_precision).mixed_precision,
            "distill.train.word_embedding_updates": embedding_updates(cfg, data.template.model),
            **({f"transfer.{k}": v for k, v in extra.info.items()} if extra else {}),
        },
    )
    tracking.log_splits(cfg.data.source, data.splits)
    with tracking.pending_model() as model_id:

        def logged(epoch: int, metrics: dict[str, float]) -> None:
            tracking.log_epoch(epoch, metrics, model_id)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)

        trained = train_student(cfg, data, logged, label)
        tracking.log_epoch(cfg.distill.train.epochs, trained.eval_metrics, model_id)
        tracking.log_array(EVAL_LOGITS, trained.eval_logits)
        model_uri = tracking.log_classifier(trained.student, cfg.data.max_length, model_id=model_id)
    history = trained.fit.history[-1]
    return StudentResult(
        tracking.active_run_id(), history[registry.METRIC], trained.eval_metrics[registry.EVAL_METRIC], model_uri, trained.eval_logits
    )
