"""Typed configuration: every default, range and meaning of a setting lives here, once.

Each frozen dataclass holds one section's defaults, checks its own ranges in ``__post_init__``
(naming the field and what was expected), and has one ``name: meaning`` line per field in its
docstring, which ``--help`` and the README's settings table print. ``kdlib/configure.py`` builds a
config from these defaults, an experiment YAML and command-line overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdlib.errors import KDError

MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
WORD_EMBEDDINGS = ("auto", "dense", "lazy", "frozen")
INT8_SCHEMES = ("dynamic", "blockwise")
PRUNERS = ("median", "hyperband", "none")
PRECISIONS = ("fp32", "bf16")


class ConfigRangeError(KDError):
    def __init__(self, key: str, expected: str, value: Any):
        self.key, self.expected, self.value = key, expected, value
        super().__init__(f"config: {key} = {value!r} is out of range; expected {expected}")


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigRangeError(key, expected, value)


@dataclass(frozen=True)
class DataConfig:
    """The labelled sentences.

    source: hub dataset name; a folder (GLUE train.tsv/dev.tsv, <split>.csv|jsonl|parquet, or save_to_disk); or builtin:sentiment
    train_split: split the models train on
    validation_split: split scored after every epoch, for pruning, the best trial and the champion (null: carved from train_split)
    validation_size: carved validation split: a share of train_split if below 1, else a number of sentences (stratified by label)
    split_seed: seed of the carved validation split
    eval_split: split scored once per trained model, never used to choose one; evaluate/export score it too
    text_column: column holding the sentence
    label_column: column holding the label (an id 0..n-1 or one of label_names)
    label_names: the label set, in id order
    max_length: wordpieces kept per sentence (SST-2 averages ~13, so 128 truncates almost nothing)
    max_train_examples: use only the first N training sentences (null: all)
    max_eval_examples: use only the first N evaluation sentences (null: all)
    """

    source: str = "stanfordnlp/sst2"
    train_split: str = "train"
    validation_split: str | None = None
    validation_size: float = 0.1
    split_seed: int = 0
    eval_split: str = "validation"
    text_column: str = "sentence"
    label_column: str = "label"
    label_names: tuple[str, ...] = ("negative", "positive")
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    def __post_init__(self) -> None:
        _check(len(self.label_names) >= 2, "label_names", "at least two label names", self.label_names)
        _check(len(set(self.label_names)) == len(self.label_names), "label_names", "distinct names", self.label_names)
        _check(self.max_length >= 8, "max_length", "an integer >= 8", self.max_length)
        _check(
            0 < self.validation_size < 1 or (self.validation_size >= 1 and float(self.validation_size).is_integer()),
            "validation_size",
            "a share in (0, 1) or a whole number of sentences >= 1",
            self.validation_size,
        )
        _check(
            self.validation_split != self.eval_split,
            "validation_split",
            f"a split other than eval_split ({self.eval_split!r}), or null",
            self.validation_split,
        )
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            _check(value is None or value >= 1, key, "an integer >= 1 or null", value)


@dataclass(frozen=True)
class ModelConfig:
    """A sequence classifier (the teacher's in ``teacher``, the student's in ``student``).

    name_or_path: hub name or local folder of a pretrained model, or scratch (a BertConfig of the sizes below)
    teacher_layers: student only: build it from these encoder layers of the teacher (DistilBERT-style) instead
    hidden_size: scratch models: hidden size
    num_layers: scratch models: encoder layers
    num_heads: scratch models: attention heads (must divide hidden_size)
    intermediate_size: scratch models: feed-forward width
    vocab_size: scratch models: WordPiece vocabulary trained on the training sentences
    """

    name_or_path: str = "bert-large-uncased"
    teacher_layers: tuple[int, ...] = ()
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 2000

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _check(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        _check(self.hidden_size % self.num_heads == 0, "hidden_size", "a multiple of num_heads", self.hidden_size)
        _check(self.vocab_size >= 100, "vocab_size", "an integer >= 100", self.vocab_size)
        _check(all(i >= 0 for i in self.teacher_layers), "teacher_layers", "layer indices >= 0", self.teacher_layers)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the teacher's in ``train``, each student's in ``distill.train``).

    Defaults follow Devlin et al. (2019) for fine-tuning BERT on GLUE: lr in {2,3,5}e-5, batch 32, 2-4 epochs.

    learning_rate: peak AdamW learning rate (linear warm-up, then linear decay to 0)
    epochs: passes over the training split
    batch_size: training sentences per step
    eval_batch_size: sentences per batch when scoring
    weight_decay: AdamW weight decay (not on biases and LayerNorm weights)
    warmup_ratio: share of the steps spent warming the learning rate up
    max_grad_norm: gradients are clipped to this norm
    grad_accum_steps: steps whose gradients add up before one update
    mixed_precision: auto (bf16 where the hardware runs it natively, fp16 on a CUDA GPU without bf16, else fp32), bf16, fp16 (CUDA only) or no
    seed: seed of the shuffling and of the fresh classifier head
    log_every: steps between host reads of the running loss (the loop syncs with the device only then)
    word_embeddings: how AdamW updates the word-embedding table (most of a small student's parameters): auto (lazy on a CPU, dense on a GPU and for a model that starts from scratch), dense (every row, every step), lazy (only the rows the step's sentences used, moments included) or frozen (kept as loaded: no gradient, no optimizer state, no update)
    """

    learning_rate: float = 2e-5
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 256
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1
    mixed_precision: str = "auto"
    seed: int = 42
    log_every: int = 50
    word_embeddings: str = "auto"

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, "learning_rate", "a number > 0", self.learning_rate)
        _check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        _check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        _check(self.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1", self.eval_batch_size)
        _check(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)", self.warmup_ratio)
        _check(self.max_grad_norm > 0, "max_grad_norm", "a number > 0", self.max_grad_norm)
        _check(self.grad_accum_steps >= 1, "grad_accum_steps", "an integer >= 1", self.grad_accum_steps)
        _check(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"one of {MIXED_PRECISION}", self.mixed_precision)
        _check(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        _check(self.word_embeddings in WORD_EMBEDDINGS, "word_embeddings", f"one of {WORD_EMBEDDINGS}", self.word_embeddings)


@dataclass(frozen=True)
class TransferConfig:
    """The transfer set: sentences that only the teacher labels (Tang et al. 2019): augmented copies of the
    training sentences, and unlabelled in-domain sentences.

    Each copy changes every word with p_mask (the model's mask token) or p_replace (one of the word's
    nearest neighbours in the teacher's input embeddings), then with p_ngram keeps only a random 1-5 word n-gram.

    copies: augmented copies per training sentence (0: none); copies equal to their sentence are dropped
    p_mask: chance that a word is masked
    p_replace: chance that a word is replaced by an embedding neighbour
    p_ngram: chance that a copy is cut to a random n-gram of 1 to 5 words
    neighbours: how many nearest embedding neighbours a replacement is drawn from
    seed: seed of the augmentation and of the draw of unlabelled sentences
    unlabelled_split: split of data.source whose sentences the teacher labels (their labels, if any, unread); sentences in the training, validation or evaluation split are left out (null: none)
    unlabelled_max: at most this many unlabelled sentences, a seeded draw (null: all)
    """

    copies: int = 0
    p_mask: float = 0.1
    p_replace: float = 0.1
    p_ngram: float = 0.25
    neighbours: int = 10
    seed: int = 0
    unlabelled_split: str | None = None
    unlabelled_max: int | None = None

    def __post_init__(self) -> None:
        _check(self.copies >= 0, "copies", "an integer >= 0", self.copies)
        for key in ("p_mask", "p_replace", "p_ngram"):
            _check(0 <= getattr(self, key) <= 1, key, "a probability in [0, 1]", getattr(self, key))
        _check(self.p_mask + self.p_replace <= 1, "p_replace", f"a probability <= 1 - p_mask ({1 - self.p_mask:g})", self.p_replace)
        _check(self.neighbours >= 1, "neighbours", "an integer >= 1", self.neighbours)
        _check(self.unlabelled_max is None or self.unlabelled_max >= 1, "unlabelled_max", "an integer >= 1 or null", self.unlabelled_max)
        _check(
            self.unlabelled_max is None or self.unlabelled_split is not None,
            "unlabelled_max",
            "null unless unlabelled_split names a split",
            self.unlabelled_max,
        )

    @property
    def enabled(self) -> bool:
        """Whether there is a transfer set at all."""
        return self.copies > 0 or self.unlabelled_split is not None


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation of one student (Hinton et al. 2015; DistilBERT uses T in 1..20).

    temperature: T, the softmax temperature of the soft targets
    alpha: weight of the KL term; 1 - alpha weighs cross-entropy on the hard labels (0 and no transfer set: plain fine-tuning)
    transfer: teacher-labelled augmented sentences, trained on with the KL term only
    train: the student's own training settings; the sweep samples some of them per trial
    """

    temperature: float = 4.0
    alpha: float = 0.5
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-4))

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature", "a number > 0", self.temperature)
        _check(0 <= self.alpha <= 1, "alpha", "a number in [0, 1]", self.alpha)


@dataclass(frozen=True)
class SearchParam:
    """One searched setting: a range (``low``..``high``, ``log`` scale) or a list of ``choices``.

    low: lowest value
    high: highest value
    log: sample on a log scale
    choices: sample one of these instead of a range
    """

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.choices:
            _check(self.low is not None and self.high is not None, "low", "low and high (or choices)", (self.low, self.high))
            _check(self.low <= self.high, "high", f"a number >= low ({self.low})", self.high)
            _check(not self.log or self.low > 0, "low", "a number > 0 on a log scale", self.low)


def _default_space() -> dict[str, SearchParam]:
    return {
        "distill.temperature": SearchParam(1.0, 20.0, log=True),
        "distill.alpha": SearchParam(0.0, 1.0),
        "distill.train.learning_rate": SearchParam(1e-5, 3e-4, log=True),
        "distill.train.epochs": SearchParam(1, 5),
    }


@dataclass(frozen=True)
class SearchConfig:
    """The Optuna sweep.

    n_trials: finished or pruned trials the study stops at (over all workers)
    timeout: seconds this worker may run (null: until n_trials are done)
    study_name: Optuna study name (null: <experiment name>-sweep)
    storage: Optuna storage: a journal file path or a database URL such as postgresql://... (null: a journal beside the MLflow store)
    pruner: median, hyperband or none
    seed: seed of the sampler: a new study's first trials, before TPE models anything, draw their settings from its creator's seed and their trial number, the same whichever worker runs them; TPE's after that (give each machine its own)
    workers: trial processes this command runs on this machine, sharing the study; CPU threads are split between those training, so a worker with no trial left gives its threads to the others (null: 2 on a CPU with 2 or more threads, several sharing a GPU as its free memory and the CPU threads allow; never more than the trials left to run)
    plain_baseline: after the trials, train the plain student (alpha 0, no transfer set, the best trial's other settings) and log distillation_gain
    start_from_config: a new study's first trial runs the experiment's own values of the searched settings (those inside their ranges; the others sampled)
    space: dotted distill.* key -> {low, high, log} or {choices}; an entry narrows the default field by field, null removes it
    """

    n_trials: int = 30
    timeout: float | None = None
    study_name: str | None = None
    storage: str | None = None
    pruner: str = "median"
    seed: int = 0
    workers: int | None = None
    plain_baseline: bool = True
    start_from_config: bool = True
    space: dict[str, SearchParam] = field(default_factory=_default_space)

    def __post_init__(self) -> None:
        _check(self.n_trials >= 1, "n_trials", "an integer >= 1", self.n_trials)
        _check(self.timeout is None or self.timeout > 0, "timeout", "a number of seconds > 0 or null", self.timeout)
        _check(self.pruner in PRUNERS, "pruner", f"one of {PRUNERS}", self.pruner)
        _check(self.workers is None or self.workers >= 1, "workers", "an integer >= 1 or null", self.workers)
        _check(bool(self.space), "space", "at least one searched setting", self.space)


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluate job: accuracy, agreement, size and latency of one model.

    model_uri: models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<path> (null: the champion student)
    split: split of data.source to score (null: data.eval_split)
    teacher_uri: agreement is measured against this model (null: the champion teacher; none: skip)
    precision: PyTorch models only: fp32, or bf16 weights and activations
    warmup: untimed calls before timing
    latency_calls: timed one-sentence calls (p50 and p95)
    throughput_batch_size: sentences per batch for throughput
    throughput_batches: timed batches for throughput
    threads: CPU threads (null: PyTorch's default, all cores; ONNX Runtime gets the same)
    """

    model_uri: str | None = None
    split: str | None = None
    teacher_uri: str | None = None
    precision: str = "fp32"
    warmup: int = 20
    latency_calls: int = 200
    throughput_batch_size: int = 32
    throughput_batches: int = 20
    threads: int | None = None

    def __post_init__(self) -> None:
        _check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)
        for key in ("latency_calls", "throughput_batch_size", "throughput_batches"):
            _check(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        _check(self.warmup >= 0, "warmup", "an integer >= 0", self.warmup)
        _check(self.threads is None or self.threads >= 1, "threads", "an integer >= 1 or null", self.threads)


@dataclass(frozen=True)
class ExportConfig:
    """The export job: ONNX, checked in ONNX Runtime, quantized to int8.

    model_uri: the PyTorch model to export (null: the champion student)
    opset: ONNX opset
    tolerance: largest |ONNX Runtime logit - PyTorch logit| accepted for the fp32 model
    parity_examples: evaluation sentences compared between PyTorch and ONNX Runtime
    int8_scheme: dynamic (small and fastest) or blockwise (closer to fp32: fewer answers moved, larger, slower); reports/results.md "Two int8 schemes"
    """

    model_uri: str | None = None
    opset: int = 18
    tolerance: float = 1e-3
    parity_examples: int = 256
    int8_scheme: str = "dynamic"

    def __post_init__(self) -> None:
        _check(self.opset >= 17, "opset", "an integer >= 17", self.opset)
        _check(self.tolerance > 0, "tolerance", "a number > 0", self.tolerance)
        _check(self.parity_examples >= 1, "parity_examples", "an integer >= 1", self.parity_examples)
        _check(self.int8_scheme in INT8_SCHEMES, "int8_scheme", f"one of {INT8_SCHEMES}", self.int8_scheme)


@dataclass(frozen=True)
class ReportConfig:
    """The sweep report.

    output_dir: the HTML report and the CSV of trials go to <output_dir>/<study name>.html|.csv
    top_k: best trials whose epoch curves, size and latency are shown
    latency_calls: timed batch-1 calls per model (5 interleaved rounds, after evaluate.warmup calls); 0 leaves latency out
    """

    output_dir: str = "reports/output"
    top_k: int = 5
    latency_calls: int = 50

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "top_k", "an integer >= 1", self.top_k)
        _check(self.latency_calls >= 0, "latency_calls", "an integer >= 0", self.latency_calls)


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: data, teacher, student, their training, the sweep and the post-training jobs.

    name: the MLflow experiment and the registered models' prefix (<name>-teacher, <name>-student)
    data: the labelled sentences
    teacher: the teacher model
    student: the student model
    train: the teacher's training
    distill: the student's distillation and training
    search: the Optuna sweep
    evaluate: the evaluate job
    export: the export job
    report: the sweep report
    cache_dir: tokenized datasets and generated data, keyed by content
    """

    name: str = "sst2-bert"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="bert-base-uncased"))
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    cache_dir: str = ".kdcache"

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "name", "a non-empty experiment name", self.name)
        unlabelled = self.distill.transfer.unlabelled_split
        scored = [self.data.eval_split] + ([self.data.validation_split] if self.data.validation_split else [])
        # The teacher's labels on a scored split would leak its answers into the student.
        _check(
            unlabelled is None or unlabelled not in scored,
            "distill.transfer.unlabelled_split",
            f"a split other than {' and '.join(map(repr, scored))} (the scored splits), or null",
            unlabelled,
        )
