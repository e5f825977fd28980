"""The search space: config keys (from the experiment's ``search.space``) sampled per trial."""

from __future__ import annotations

from typing import Any

import optuna

from kdlib.config import ExperimentConfig
from kdlib.configure import field_type, flatten, replace
from kdlib.errors import KDError


def validate(cfg: ExperimentConfig) -> None:
    """Every searched key is a student setting and both ends of its range are valid values."""
    for key, param in cfg.search.space.items():
        if not key.startswith("distill."):
            raise KDError(
                f"config: search.space.{key} is not a student setting; expected a key under distill. (the teacher and its logits are fixed during a sweep)"
            )
        field_type(key)
        for value in param.choices or (param.low, param.high):
            replace(cfg, {key: value})  # raises with the key and the allowed range


def suggest(trial: optuna.Trial, cfg: ExperimentConfig) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, param in cfg.search.space.items():
        kind = field_type(key)
        if param.choices:
            params[key] = trial.suggest_categorical(key, list(param.choices))
        elif kind is int:
            params[key] = trial.suggest_int(key, int(param.low), int(param.high), log=param.log)
        elif kind is float:
            params[key] = trial.suggest_float(key, param.low, param.high, log=param.log)
        else:
            raise KDError(f"config: search.space.{key} is a {kind} setting; expected choices instead of low/high")
    return params


def configured(cfg: ExperimentConfig) -> dict[str, Any]:
    """The experiment's own values of the searched settings, as the trial would suggest them; a value
    outside its searched range is left out (the sampler draws it)."""
    values = flatten(cfg)
    inside: dict[str, Any] = {}
    for key, param in cfg.search.space.items():
        if param.choices:
            # Choices are kept as typed ("2", "0.5"); the one that reads as the configured value.
            same = [choice for choice in param.choices if flatten(replace(cfg, {key: choice}))[key] == values[key]]
            if same:
                inside[key] = same[0]
        elif param.low <= values[key] <= param.high:
            inside[key] = values[key]
    return inside
