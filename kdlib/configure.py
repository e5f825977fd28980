"""Building a config: defaults, then the experiment YAML, then command-line overrides; and describing it.

Overrides are dotted keys (``train.learning_rate=3e-5`` or ``--train.learning_rate 3e-5``, the
form ``mlflow run -P`` passes). OmegaConf structured configs merge the three field by field at every
depth, starting from the default *instances* of ``kdlib/config.py`` (so ``distill.train`` keeps its
own learning rate when one of its other fields is set), and convert values to each field's declared
type. Hand-written here, because OmegaConf has no such notion: the ``key=value`` command line, the
search space's dotted entry names, and turning every refusal into one ``KDError`` line that names
the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdlib.config import ConfigRangeError, ExperimentConfig, SearchParam
from kdlib.errors import KDError

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
