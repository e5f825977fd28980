"""Typed configuration: every default lives here, once.

Precedence (lowest to highest): these dataclass defaults, the experiment YAML, command-line
overrides given as dotted keys (``train.learning_rate=3e-5`` or ``--train.learning_rate 3e-5``,
the form ``mlflow run -P`` passes). Each dataclass checks its own ranges in ``__post_init__``;
``build_config`` checks keys and types, so every mistake is reported with the key that holds it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdlib.errors import KDError

MIXED_PRECISION = ("bf16", "fp16", "no")
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
    # Hub dataset name, a folder (GLUE train.tsv/dev.tsv, {split}.csv|jsonl|parquet files, or a
    # save_to_disk folder), or "builtin:sentiment" for the generated demo sample.
    source: str = "stanfordnlp/sst2"
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "sentence"
    label_column: str = "label"
    # Labels may be given in the data as ids 0..n-1 or as these names.
    label_names: tuple[str, ...] = ("negative", "positive")
    # SST-2 sentences average ~13 wordpieces; 128 truncates almost nothing.
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
    # Hub name or local folder of a pretrained model, or "scratch": a BertConfig model of the
    # sizes below with a WordPiece tokenizer trained on the training sentences.
    name_or_path: str = "bert-large-uncased"
    # Student only: build the model from these encoder layers of the teacher (DistilBERT-style)
    # instead of loading name_or_path.
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
    # Devlin et al. (2019) fine-tune BERT on GLUE with lr in {2,3,5}e-5, batch 32, 2-4 epochs.
    learning_rate: float = 2e-5
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 256
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1
    mixed_precision: str = "bf16"
    seed: int = 42
    # Steps between host reads of the running loss; the loop syncs with the device only then.
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
    # Hinton et al. (2015) and DistilBERT use T in 1..20 and weight the soft targets heavily.
    temperature: float = 4.0
    alpha: float = 0.5
    # The student's own training settings; the sweep samples some of them per trial.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-4))

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature", "a number > 0", self.temperature)
        _check(0 <= self.alpha <= 1, "alpha", "a number in [0, 1]", self.alpha)


@dataclass(frozen=True)
class SearchParam:
    """One searched setting: a range (``low``..``high``, ``log`` scale) or a list of ``choices``."""

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
    n_trials: int = 30
    timeout: float | None = None  # seconds for this worker; None: until n_trials are done
    study_name: str | None = None  # None: "<experiment name>-sweep"
    # None: an Optuna journal file next to the MLflow store; or any Optuna storage URL
    # (postgresql://... for several workers or machines).
    storage: str | None = None
    pruner: str = "median"
    seed: int = 0
    # Config keys (dotted) -> their search range. Narrow any of them or add any distill setting.
    space: dict[str, SearchParam] = field(default_factory=_default_space)

    def __post_init__(self) -> None:
        _check(self.n_trials >= 1, "n_trials", "an integer >= 1", self.n_trials)
        _check(self.timeout is None or self.timeout > 0, "timeout", "a number of seconds > 0 or null", self.timeout)
        _check(self.pruner in PRUNERS, "pruner", f"one of {PRUNERS}", self.pruner)
        _check(bool(self.space), "space", "at least one searched setting", self.space)


@dataclass(frozen=True)
class EvaluateConfig:
    # Any model URI: models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/<path>.
    # None: the experiment's champion student.
    model_uri: str | None = None
    # None: data.eval_split of data.source.
    split: str | None = None
    # Agreement is measured against this model; None: the champion teacher, "none": skip.
    teacher_uri: str | None = None
    # PyTorch models only: fp32, or bf16 weights and activations.
    precision: str = "fp32"
    # Latency: untimed warm-up calls, then timed batch-1 calls and batches of throughput_batch_size.
    warmup: int = 20
    latency_calls: int = 200
    throughput_batch_size: int = 32
    throughput_batches: int = 20
    # None: PyTorch's default (all cores); ONNX Runtime gets the same number.
    threads: int | None = None

    def __post_init__(self) -> None:
        _check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)
        for key in ("latency_calls", "throughput_batch_size", "throughput_batches"):
            _check(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        _check(self.warmup >= 0, "warmup", "an integer >= 0", self.warmup)
        _check(self.threads is None or self.threads >= 1, "threads", "an integer >= 1 or null", self.threads)


@dataclass(frozen=True)
class ExportConfig:
    # None: the experiment's champion student.
    model_uri: str | None = None
    opset: int = 18
    # Largest |ONNX Runtime logit - PyTorch logit| accepted for the fp32 model.
    tolerance: float = 1e-3
    # Sentences of the eval split compared between PyTorch and ONNX Runtime.
    parity_examples: int = 256

    def __post_init__(self) -> None:
        _check(self.opset >= 17, "opset", "an integer >= 17", self.opset)
        _check(self.tolerance > 0, "tolerance", "a number > 0", self.tolerance)
        _check(self.parity_examples >= 1, "parity_examples", "an integer >= 1", self.parity_examples)


@dataclass(frozen=True)
class ReportConfig:
    # The HTML report and the CSV of trials go to <output_dir>/<study name>.html|.csv.
    output_dir: str = "reports/output"
    # Best trials whose epoch curves, size and latency are shown.
    top_k: int = 5
    # Timed batch-1 calls per model (PyTorch fp32, after evaluate.warmup calls) for the accuracy-versus-
    # latency view, taken in 5 rounds in which the models take turns; 0 leaves latency out.
    latency_calls: int = 50

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "top_k", "an integer >= 1", self.top_k)
        _check(self.latency_calls >= 0, "latency_calls", "an integer >= 0", self.latency_calls)


@dataclass(frozen=True)
class ExperimentConfig:
    # Names the MLflow experiment and the registered models (<name>-teacher, <name>-student).
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
    # Tokenized datasets and generated data live here, keyed by content.
    cache_dir: str = ".kdcache"

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "name", "a non-empty experiment name", self.name)


# --- building a config from YAML and overrides --------------------------------------------------


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or say what was expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(key, inner[0], value)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise KDError(f"config: {key} = {value!r} has the wrong type; expected a list")
        return tuple(_coerce(key, item_tp, v.strip() if isinstance(v, str) else v) for v in value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise KDError(f"config: {key} = {value!r} has the wrong type; expected true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise KDError(f"config: {key} = {value!r} has the wrong type; expected {'an integer' if tp is int else 'a number'}")
        try:
            # YAML reads 3e-5 (no dot) as a string, so numbers are parsed from strings too.
            number = float(value) if tp is float else int(str(value)) if isinstance(value, str) else value
        except ValueError:
            number = None
        if tp is int and isinstance(number, float) and number.is_integer():
            number = int(number)
        if number is None or (tp is int and not isinstance(number, int)) or not isinstance(number, (int, float)):
            raise KDError(f"config: {key} = {value!r} has the wrong type; expected {'an integer' if tp is int else 'a number'}")
        return tp(number)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise KDError(f"config: {key} = {value!r} has the wrong type; expected a string")
        return str(value)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise KDError(f"config: unknown key {key!r}; expected one of {sorted(prefix + n for n in names)}")
        if typing.get_origin(hints[name]) is dict:
            default = next(f for f in dataclasses.fields(cls) if f.name == name).default_factory()
            kwargs[name] = _build_mapping(typing.get_args(hints[name])[1], default, value, key)
        elif _is_config(hints[name]):
            if not isinstance(value, dict):
                raise KDError(f"config: {key} = {value!r} has the wrong type; expected a mapping of its fields")
            kwargs[name] = _build(hints[name], value, f"{key}.")
        else:
            kwargs[name] = _coerce(key, hints[name], value)
    try:
        return cls(**kwargs)
    except ConfigRangeError as exc:
        raise ConfigRangeError(f"{prefix}{exc.key}", exc.expected, exc.value) from None


def _entries(value: Any, fields: set[str], key: str, prefix: str = "") -> dict[str, dict | None]:
    """Flatten nested mappings (dotted overrides arrive nested) down to entries holding ``fields``."""
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
            out.update(_entries(entry, fields, key, f"{path}."))
    return out


def _build_mapping(cls: type, default: dict[str, Any], value: Any, key: str) -> dict[str, Any]:
    """Entries from YAML/overrides update the default entries field by field; ``null`` removes one."""
    merged = {name: dataclasses.asdict(entry) for name, entry in default.items()}
    for name, raw in _entries(value, {f.name for f in dataclasses.fields(cls)}, key).items():
        if raw is None:
            merged.pop(name, None)
        else:
            merged[name] = {**merged.get(name, {}), **raw}
    return {name: _build(cls, raw, f"{key}.{name}.") for name, raw in merged.items()}


def _nest(overrides: dict[str, str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KDError(f"config: override {dotted!r} conflicts with another override of {part!r}")
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_experiment_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise KDError(f"experiment file {str(path)!r} does not exist; expected a YAML file such as experiments/smoke.yaml")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise KDError(f"experiment file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise KDError(f"experiment file {str(path)!r} is not valid YAML: {exc}") from None
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


def build_config(experiment_file: str | Path | None = None, overrides: dict[str, str] | None = None) -> ExperimentConfig:
    """Defaults, then the experiment file, then the overrides; validated."""
    values = read_experiment_file(experiment_file) if experiment_file else {}
    values = _merge(values, _nest(overrides or {}))
    try:
        return _build(ExperimentConfig, values, "")
    except TypeError as exc:  # a dataclass constructor rejected a value the coercion let through
        raise KDError(f"config: {exc}") from None


def field_type(dotted: str) -> Any:
    """The declared type of a dotted config key, e.g. ``distill.train.epochs`` -> int."""
    cls: Any = ExperimentConfig
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if _is_config(cls) else {}
        if part not in hints:
            raise KDError(f"config: unknown key {dotted!r}")
        cls = hints[part]
    if _is_config(cls) or typing.get_origin(cls) is dict:
        raise KDError(f"config: {dotted!r} is a section, not a setting")
    return cls


def replace(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with dotted-key overrides applied and validated like any other."""
    return _build(ExperimentConfig, _merge(dataclasses.asdict(cfg), _nest(overrides)), "")


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
