"""params.yaml → frozen dataclasses, validated strictly.

Every stage loads the whole file through `load_params`, so a typo anywhere stops
the pipeline before any work, with one line naming the key, the value and what is
allowed. Unknown keys are errors too: a misspelt `learning_rate` must not be
silently ignored while the default `lr` trains the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnist_pipeline.datasets import DATASETS

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("onecycle", "cosine", "plateau", "step", "none")
EXPORT_FORMATS = ("onnx", "pt2")


class ParamsError(ValueError):
    """A params.yaml problem; the message is one line meant for the user."""


def _rule(**rules: Any) -> Any:
    """A dataclass field with validation rules (choices, gt, ge, lt, le, min_len, item_ge)."""
    return field(metadata=rules)


@dataclass(frozen=True)
class MLPParams:
    hidden: tuple[int, ...] = _rule(min_len=1, item_ge=1)
    dropout: float = _rule(ge=0.0, lt=1.0)


@dataclass(frozen=True)
class CNNParams:
    channels: tuple[tuple[int, ...], ...] = _rule(min_len=1, item_ge=1)
    dropout: float = _rule(ge=0.0, lt=1.0)


@dataclass(frozen=True)
class DataParams:
    val_size: int = _rule(ge=len(DATASETS["mnist"].classes))


@dataclass(frozen=True)
class AugmentParams:
    enabled: bool = _rule()
    rotate: float = _rule(ge=0.0, le=180.0)
    scale: float = _rule(ge=0.0, lt=1.0)
    shift: float = _rule(ge=0.0, le=14.0)


@dataclass(frozen=True)
class EarlyStoppingParams:
    patience: int = _rule(ge=0)
    min_delta: float = _rule(ge=0.0)


@dataclass(frozen=True)
class TrainParams:
    epochs: int = _rule(ge=1)
    batch_size: int = _rule(ge=1)
    optimizer: str = _rule(choices=OPTIMIZERS)
    lr: float = _rule(gt=0.0)
    momentum: float = _rule(ge=0.0, lt=1.0)
    nesterov: bool = _rule()
    weight_decay: float = _rule(ge=0.0)
    scheduler: str = _rule(choices=SCHEDULERS)
    warmup: float = _rule(gt=0.0, lt=1.0)
    step_size: int = _rule(ge=1)
    gamma: float = _rule(gt=0.0, le=1.0)
    plateau_patience: int = _rule(ge=0)
    label_smoothing: float = _rule(ge=0.0, lt=1.0)
    ema: float = _rule(ge=0.0, lt=1.0)
    augment: AugmentParams = _rule()
    early_stopping: EarlyStoppingParams = _rule()


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _rule(ge=1)


@dataclass(frozen=True)
class ExportParams:
    formats: tuple[str, ...] = _rule(min_len=1, item_choices=EXPORT_FORMATS)
    opset: int = _rule(ge=18, le=23)
    parity_samples: int = _rule(ge=1)


@dataclass(frozen=True)
class Params:
    seed: int = _rule(ge=0)
    dataset: str = _rule(choices=tuple(DATASETS))
    model: str = _rule(choices=MODELS)
    mlp: MLPParams = _rule()
    cnn: CNNParams = _rule()
    data: DataParams = _rule()
    train: TrainParams = _rule()
    evaluate: EvaluateParams = _rule()
    export: ExportParams = _rule()

    def model_kwargs(self) -> dict[str, Any]:
        """The selected model's section, as keyword arguments for `models.build_model`."""
        return as_dict(getattr(self, self.model))


def as_dict(obj: Any) -> Any:
    """A params dataclass as plain dicts and lists (JSON/YAML friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [as_dict(item) for item in obj]
    return obj


def _fail(key: str, value: Any, expected: str) -> typing.NoReturn:
    raise ParamsError(f"params.yaml: {key} = {value!r} is invalid: expected {expected}")


def _convert(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, list):
            _fail(key, value, "a list")
        return tuple(_convert(item, item_hint, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(key, value, "a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
        return value
    raise TypeError(f"unsupported params type {hint!r} for {key}")


def _check_rules(key: str, value: Any, rules: dict[str, Any]) -> None:
    if "choices" in rules and value not in rules["choices"]:
        _fail(key, value, "one of " + ", ".join(rules["choices"]))
    bounds = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
              "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}
    for name, (symbol, ok) in bounds.items():
        if name in rules and not ok(value, rules[name]):
            _fail(key, value, f"a value {symbol} {rules[name]}")
    if "min_len" in rules and len(value) < rules["min_len"]:
        _fail(key, value, f"a list of at least {rules['min_len']} item(s)")
    if "item_choices" in rules:
        for item in value:
            if item not in rules["item_choices"]:
                _fail(key, list(value), "a list drawn from " + ", ".join(rules["item_choices"]))
        if len(set(value)) != len(value):
            _fail(key, list(value), "a list without repeats")
    if "item_ge" in rules:
        flat = [x for item in value for x in (item if isinstance(item, tuple) else (item,))]
        if (isinstance(value[0], tuple) and any(len(item) == 0 for item in value)) or any(
            x < rules["item_ge"] for x in flat
        ):
            _fail(key, as_dict(value), f"non-empty lists of integers >= {rules['item_ge']}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if not isinstance(data, dict):
        raise ParamsError(f"params.yaml: {where} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ParamsError(f"params.yaml: unknown key '{full}' (allowed in {where}: {', '.join(names)})")
    values = {}
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data:
            raise ParamsError(f"params.yaml: missing key '{full}'")
        values[f.name] = _convert(data[f.name], hints[f.name], full)
        _check_rules(full, values[f.name], dict(f.metadata))
    return cls(**values)


def parse_params(data: Any) -> Params:
    """Validate a loaded params mapping; raises ParamsError with a one-line message."""
    params = _build(Params, data, "")
    train_size = DATASETS[params.dataset].train_size
    if params.data.val_size >= train_size:
        _fail("data.val_size", params.data.val_size,
              f"fewer than the {train_size} training images of {params.dataset}")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_params(data)


def stage_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser every stage script starts from: its summary line and `--params`."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    return parser


def load_params_or_exit(path: str | Path = "params.yaml") -> Params:
    """For stage scripts: a params error is one line on stderr and exit code 2."""
    try:
        return load_params(path)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
