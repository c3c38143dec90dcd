"""The hyperparameter search space: plain data (a mapping, or YAML) checked against TrainConfig.

Each entry names a TrainConfig field and how to draw it::

    lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    freeze_epochs: {type: int, low: 0, high: 2}
    augment: {type: categorical, choices: [none, light]}

A space given by the user replaces the default one entirely, so what is searched is exactly what
the file says; `DEFAULT_SPACE` (also written to every tune folder as `space.yaml`) is the place to
start from. Options fixed by the caller win over the space: `--batch-size 8` takes batch_size out
of the search.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    "freeze_epochs": {"type": "int", "low": 0, "high": 2},
    "lr_mult": {"type": "float", "low": 1.0, "high": 100.0, "log": True},
    "schedule": {"type": "categorical", "choices": ["flat_cos", "one_cycle", "cosine"]},
    "pct_start": {"type": "float", "low": 0.1, "high": 0.9},
    "augment": {"type": "categorical", "choices": ["none", "light", "medium", "heavy"]},
    "loss": {"type": "categorical", "choices": ["ce", "focal"]},
    "balance": {"type": "categorical", "choices": ["none", "sampler", "weights"]},
}

# Fields that define the data, the objective or the machine rather than the model's training.
NOT_SEARCHABLE = frozenset(
    {"data", "label_regex", "val_fraction", "test_fraction", "max_pixels", "monitor", "report",
     "seed", "device", "workers", "threads", "out"}
)
KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"}}


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field and its distribution."""

    name: str
    type: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        spec = {"type": self.type, "low": self.low, "high": self.high, "log": self.log}
        return {**spec, "step": self.step} if self.step is not None else spec


def load_space(space: str | os.PathLike | dict | None, fixed: dict[str, Any]) -> list[Param]:
    """The searched parameters: `space` (a YAML file or a mapping; None: the default) less `fixed`.

    Every bound and choice is validated as a TrainConfig value together with the fixed options,
    so a space that could produce an invalid run fails here, before any trial, with one message.
    """
    if space is None:
        spec = dict(DEFAULT_SPACE)
        epochs = build_config(fixed).epochs
        spec["freeze_epochs"] = {**spec["freeze_epochs"], "high": min(spec["freeze_epochs"]["high"], epochs)}
        source = "the default search space"
    elif isinstance(space, dict):
        spec, source = space, "the search space"
    else:
        spec, source = _read_yaml(Path(space)), str(space)
    params = [_parse(name, entry, source) for name, entry in spec.items() if name not in fixed]
    if not params:
        raise UserError(f"nothing to search: every parameter of {source} is fixed by the given options")
    for param in params:
        _check_values(param, fixed, source)
    return params


def space_yaml(params: list[Param]) -> str:
    return yaml.safe_dump({p.name: p.to_dict() for p in params}, sort_keys=False)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"search space file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(spec, dict) or not spec:
        raise UserError(f"{path} must map option names to distributions, e.g. lr: {{type: float, low: 1e-4, high: 1e-2, log: true}}")
    return spec


def _parse(name: str, entry: Any, source: str) -> Param:
    where = f"'{name}' in {source}"
    if name not in TrainConfig.model_fields:
        close = difflib.get_close_matches(name, [f for f in TrainConfig.model_fields if f not in NOT_SEARCHABLE], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown option {where}{hint}")
    if name in NOT_SEARCHABLE:
        raise UserError(f"{where} cannot be searched; give it as a fixed option instead")
    if not isinstance(entry, dict) or entry.get("type") not in KEYS:
        raise UserError(f"{where} needs a mapping with type: float, int or categorical")
    kind = entry["type"]
    extra = set(entry) - KEYS[kind] - {"type"}
    if extra:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(extra))} for type {kind} (allowed: {', '.join(sorted(KEYS[kind]))})")
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: categorical needs a non-empty list of choices")
        return Param(name, kind, choices=tuple(choices))
    low, high = _number(entry.get("low")), _number(entry.get("high"))
    if low is None or high is None:
        raise UserError(f"{where}: {kind} needs numeric low and high")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
        raise UserError(f"{where}: int bounds must be whole numbers")
    if low >= high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    log, step = bool(entry.get("log", False)), _number(entry.get("step"))
    if "step" in entry and (step is None or step <= 0):
        raise UserError(f"{where}: step must be a positive number")
    if log and (low <= 0 or step is not None):
        raise UserError(f"{where}: log needs low > 0 and no step")
    return Param(name, kind, low, high, log, step)


def _number(value: Any) -> float | None:
    """YAML reads `1e-4` (no dot) as a string; accept it as the number it plainly is."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_values(param: Param, fixed: dict[str, Any], source: str) -> None:
    if param.type == "categorical":
        values = list(param.choices)
    elif param.type == "int":
        values = [int(param.low), int(param.high)]
    else:
        values = [param.low, param.high]
    for value in values:
        try:
            build_config({**fixed, param.name: value})
        except UserError as exc:
            raise UserError(f"'{param.name}' in {source} allows {value!r}, which is not a valid run: {exc}") from None
