"""Typed configuration: every default and every setting's meaning live here, once.

Precedence (lowest to highest): these dataclass defaults, the experiment YAML, command-line
overrides given as dotted keys (``train.learning_rate=3e-5`` or ``--train.learning_rate 3e-5``,
the form ``mlflow run -P`` passes). OmegaConf structured configs merge the three field by field at
every depth, starting from the default *instances* (so ``distill.train`` keeps its own learning
rate when one of its other fields is set) and convert values to each field's declared type. Each
dataclass checks its own ranges in ``__post_init__``. Every mistake becomes one ``KDError`` line
that names the key and what was expected.

Each class's docstring has one ``name: meaning`` line per field; ``--help`` prints them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdlib.errors import KDError

MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
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
    eval_split: split scored after every epoch and by evaluate/export
    text_column: column holding the sentence
    label_column: column holding the label (an id 0..n-1 or one of label_names)
    label_names: the label set, in id order
    max_length: wordpieces kept per sentence (SST-2 averages ~13, so 128 truncates almost nothing)
    max_train_examples: use only the first N training sentences (null: all)
    max_eval_examples: use only the first N evaluation sentences (null: all)
    """

    source: str = "stanfordnlp/sst2"
    train_split: str = "train"
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


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation of one student (Hinton et al. 2015; DistilBERT uses T in 1..20).

    temperature: T, the softmax temperature of the soft targets
    alpha: weight of the KL term; 1 - alpha weighs cross-entropy on the hard labels (0: plain fine-tuning)
    train: the student's own training settings; the sweep samples some of them per trial
    """

    temperature: float = 4.0
    alpha: float = 0.5
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
    seed: seed of the TPE sampler (give each worker its own)
    space: dotted distill.* key -> {low, high, log} or {choices}; an entry narrows the default field by field, null removes it
    """

    n_trials: int = 30
    timeout: float | None = None
    study_name: str | None = None
    storage: str | None = None
    pruner: str = "median"
    seed: int = 0
    space: dict[str, SearchParam] = field(default_factory=_default_space)

    def __post_init__(self) -> None:
        _check(self.n_trials >= 1, "n_trials", "an integer >= 1", self.n_trials)
        _check(self.timeout is None or self.timeout > 0, "timeout", "a number of seconds > 0 or null", self.timeout)
        _check(self.pruner in PRUNERS, "pruner", f"one of {PRUNERS}", self.pruner)
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
    """

    model_uri: str | None = None
    opset: int = 18
    tolerance: float = 1e-3
    parity_examples: int = 256

    def __post_init__(self) -> None:
        _check(self.opset >= 17, "opset", "an integer >= 17", self.opset)
        _check(self.tolerance > 0, "tolerance", "a number > 0", self.tolerance)
        _check(self.parity_examples >= 1, "parity_examples", "an integer >= 1", self.parity_examples)


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


# --- reading and merging ----------------------------------------------------------------------------

SPACE = "search.space"


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(dotted: str) -> Any:
    """The declared type of a dotted config key, e.g. ``distill.train.epochs`` -> int."""
    cls: Any = ExperimentConfig
    for part in dotted.split("."):
        hints = _hints(cls) if _is_config(cls) else {}
        if part not in hints:
            raise KDError(f"config: unknown key {dotted!r}")
        cls = hints[part]
    if _is_config(cls) or typing.get_origin(cls) is dict:
        raise KDError(f"config: {dotted!r} is a section, not a setting")
    return cls


def describe_type(tp: Any) -> str:
    """What a value of ``tp`` looks like, in words: 'an integer', 'a number or null', ..."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return f"{describe_type(inner)} or null"
    if typing.get_origin(tp) is tuple:
        return f"a list of {describe_type(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _expected_for(dotted: str) -> str:
    try:
        return describe_type(field_type(dotted))
    except KDError:
        return "a mapping of its fields"


def _section_keys(dotted: str) -> list[str]:
    """The keys one level inside the section that holds ``dotted`` (for 'unknown key' messages)."""
    cls: Any = ExperimentConfig
    *parents, _ = dotted.split(".")
    for part in parents:
        cls = _hints(cls).get(part) if _is_config(cls) else None
    prefix = "".join(f"{p}." for p in parents)
    return sorted(prefix + f.name for f in dataclasses.fields(cls)) if _is_config(cls) else []


def _scalar_section(values: dict[str, Any], cls: type, prefix: str = "") -> tuple[str, Any]:
    """(dotted key, value) of the first section in ``values`` that holds a plain value instead of a mapping."""
    for name, value in values.items():
        tp = _hints(cls).get(name)
        if _is_config(tp):
            if not isinstance(value, dict):
                return f"{prefix}{name}", value
            found = _scalar_section(value, tp, f"{prefix}{name}.")
            if found[0]:
                return found
    return "", None


def _omegaconf_error(exc: OmegaConfBaseException, values: Any) -> KDError:
    """One line naming the key for anything OmegaConf refused."""
    key = exc.full_key or ""
    if not key:  # a whole section given a scalar: OmegaConf names neither
        key, value = _scalar_section(values, ExperimentConfig)
        return KDError(f"config: {key} = {value!r} has the wrong type; expected a mapping of its fields")
    if "not in" in str(exc).splitlines()[0]:  # ConfigKeyError
        return KDError(f"config: unknown key {key!r}; expected one of {_section_keys(key)}")
    return KDError(f"config: {key} = {exc.value!r} has the wrong type; expected {_expected_for(key)}")


def _space_entries(value: Any, key: str, prefix: str = "") -> dict[str, dict | None]:
    """Flatten ``search.space`` down to entries: its keys are dotted config keys, which overrides nest."""
    fields = {f.name for f in dataclasses.fields(SearchParam)}
    if not isinstance(value, dict):
        raise KDError(f"config: {key} = {value!r} has the wrong type; expected a mapping")
    out: dict[str, dict | None] = {}
    for name, entry in value.items():
        path = f"{prefix}{name}"
        if entry is None:
            out[path] = None
        elif not isinstance(entry, dict):
            raise KDError(f"config: {key}.{path} = {entry!r} has the wrong type; expected a mapping of {sorted(fields)}")
        elif set(entry) <= fields:
            out[path] = {**(out.get(path) or {}), **entry}
        else:
            out.update(_space_entries(entry, key, f"{path}."))
    return out


def _apply_space(merged: DictConfig, layer: dict[str, Any]) -> None:
    """Entries of one layer update the space's entries field by field; ``null`` removes one."""
    raw = layer.get("search", {}).pop("space", None) if isinstance(layer.get("search"), dict) else None
    if raw is None:
        return
    space = merged.search.space
    for name, entry in _space_entries(raw, SPACE).items():
        if entry is None:
            space.pop(name, None)
            continue
        try:
            space[name] = OmegaConf.merge(space[name] if name in space else _writable(OmegaConf.structured(SearchParam)), entry)
        except OmegaConfBaseException as exc:
            field_name = (exc.full_key or "").rpartition(".")[2] or exc.key
            raise KDError(f"config: {SPACE}.{name}.{field_name} = {exc.value!r} is not valid; {str(exc).splitlines()[0]}") from None


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys to nested mappings; tuple settings also accept ``0,2,4`` (what ``-P`` users type)."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KDError(f"config: override {dotted!r} conflicts with another override of {part!r}")
        node[leaf] = _parse_value(dotted, value)
    return nested


def _parse_value(dotted: str, value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        # Search ranges are floats: an integer setting's bound 3.0 means 3.
        return int(value) if _declared(dotted) is int else value
    if not isinstance(value, str):
        return value
    declared = _declared(dotted)
    nullable = declared is None or type(None) in typing.get_args(declared)  # search.space entries: null removes one
    if nullable and value.strip().lower() in ("null", "none", "~"):
        return None  # but search.pruner=none stays the string "none"
    if typing.get_origin(declared) is tuple:
        return [item.strip() for item in value.strip("[]()").split(",") if item.strip()]
    # Other strings stay strings: OmegaConf converts them to the field's type ("3e-5", "2", "true"),
    # and a str field keeps "no" as typed (a YAML parse would make it False).
    return value


def _declared(dotted: str) -> Any:
    """The field's type, or None for keys that are unknown (reported by the merge) or inside the search space."""
    try:
        return field_type(dotted)
    except KDError:
        return None


def _locate_range_error(merged: DictConfig, exc: ConfigRangeError, path: str = "") -> str:
    """The dotted section whose own check failed (checks name only their field)."""
    for name in merged:
        node = merged[name]
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None):
            try:
                OmegaConf.to_object(node)
            except ConfigRangeError as inner:
                if (inner.key, inner.value) == (exc.key, exc.value):
                    return _locate_range_error(node, exc, f"{path}{name}.")
        elif isinstance(node, DictConfig):  # the search space: name -> SearchParam
            found = _locate_range_error(node, exc, f"{path}{name}.")
            if found != f"{path}{name}.":
                return found
    return path


def _writable(node: DictConfig) -> DictConfig:
    """OmegaConf marks the nodes of frozen dataclasses read-only; merging writes into them."""
    OmegaConf.set_readonly(node, False)
    for name in node:
        if isinstance(node[name], DictConfig):
            _writable(node[name])
    return node


def _assemble(layers: list[dict[str, Any]], base: ExperimentConfig) -> ExperimentConfig:
    merged = _writable(OmegaConf.structured(base))
    for layer in layers:
        _apply_space(merged, layer)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(exc, layer) from None
    try:
        return OmegaConf.to_object(merged)
    except ConfigRangeError as exc:
        raise ConfigRangeError(_locate_range_error(merged, exc) + exc.key, exc.expected, exc.value) from None


def read_experiment_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise KDError(f"experiment file {str(path)!r} does not exist; expected a YAML file such as experiments/smoke.yaml")
    raw = path.read_bytes()
    try:
        # Decoded whole, so the offset is the file's own (a streaming reader counts from its chunk).
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise KDError(f"experiment file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}, line {line})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KDError(f"experiment file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise KDError(f"experiment file {str(path)!r} must hold a mapping of config keys, not {type(values).__name__}")
    return values


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Read ``key=value`` and ``--key value`` / ``--key=value`` pairs into a flat dict of dotted keys."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if i + 1 >= len(args):
                    raise KDError(f"override --{arg} has no value; expected --{arg} VALUE or {arg}=VALUE")
                arg = f"{arg}={args[i + 1]}"
                i += 1
        if "=" not in arg:
            raise KDError(f"override {arg!r} is not of the form key=value (for example train.learning_rate=3e-5)")
        key, value = arg.split("=", 1)
        overrides[key.strip()] = value
        i += 1
    return overrides


def build_config(experiment_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Defaults, then the experiment file, then the overrides; validated."""
    values = read_experiment_file(experiment_file) if experiment_file else {}
    return _assemble([values, _nest(overrides or {})], ExperimentConfig())


def replace(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with dotted-key overrides applied and validated like any other."""
    return _assemble([_nest(overrides)], cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    """The whole config as YAML, in the form an experiment file takes."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value, for logging every setting of a run as MLflow params."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(flatten(value, f"{prefix}{f.name}."))
        else:
            flat[f"{prefix}{f.name}"] = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return flat


def field_help(cls: type = ExperimentConfig) -> dict[str, str]:
    """``name: meaning`` lines of a config class's docstring, by field name."""
    lines = (line.strip() for line in (cls.__doc__ or "").splitlines())
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: meaning.strip() for name, _, meaning in (line.partition(":") for line in lines) if name in names}


def settings(cfg: Any = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type in words, default, meaning) of every setting, sections expanded, for ``--help``."""
    cfg = ExperimentConfig() if cfg is None else cfg
    helps, hints = field_help(type(cfg)), _hints(type(cfg))
    out = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += settings(value, f"{key}.")
        elif typing.get_origin(hints[f.name]) is dict:
            shown = "; ".join(f"{k}: {_range_text(p)}" for k, p in value.items())
            out.append((key, "a mapping", shown, helps[f.name]))
        else:
            out.append((key, describe_type(hints[f.name]), value, helps[f.name]))
    return out


def shown(default: Any) -> str:
    """A default as a user would type it."""
    return "null" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def settings_table() -> str:
    """Every setting as a markdown table (README.md holds a copy; a test keeps them equal)."""
    # Markdown: a | would end the cell, and <name> would be read as an HTML tag.
    rows = [
        f"| `{key}` | {kind} | `{shown(default)}` | {meaning.replace('|', '&#124;').replace('<', '&lt;')} |"
        for key, kind, default, meaning in settings()
    ]
    return "\n".join(["| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows])


def _range_text(param: SearchParam) -> str:
    if param.choices:
        return "one of " + ", ".join(param.choices)
    return f"{param.low:g}..{param.high:g}{' log' if param.log else ''}"
