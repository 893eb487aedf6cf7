"""params.yaml → frozen pydantic models, validated strictly.

Every stage loads the whole file through `load_params`, so a typo anywhere stops
the pipeline before any work, with one line naming the key, the value and what is
allowed. Unknown keys are errors too: a misspelt `learning_rate` must not be
silently ignored while the default `lr` trains the model. Types are strict (no
"0.1" strings for numbers, no 1 for true).

The file is read as DVC reads it: ruamel.yaml's safe loader, YAML 1.2 (so `1e-3` is a
number and `yes` a string). `apply_overrides` is DVC's own `-S` implementation (Hydra's
override grammar, `dvc.utils.hydra`), run on a copy of the params.
"""

from __future__ import annotations

import io
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, ValidationError

from mnist_pipeline.datasets import DATASETS
from mnist_pipeline.errors import ParamsError

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Probability = Annotated[Float, Field(ge=0.0, lt=1.0)]
Width = Annotated[Int, Field(ge=1)]
# The model names: each is a section of params.yaml below, and a key of models.MODELS
# (tests/test_params.py keeps the two in step; this module stays torch-free).
ModelName = Literal["mlp", "cnn"]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataParams(Section):
    # Bounded by the chosen dataset's size in `parse_params`, the one place it is checked.
    val_size: Int = Field(ge=1)


class AugmentParams(Section):
    enabled: StrictBool
    rotate: Float = Field(ge=0.0, le=180.0)
    scale: Probability
    shift: Float = Field(ge=0.0, le=14.0)
    elastic: Float = Field(ge=0.0, le=100.0)
    elastic_sigma: Float = Field(gt=0.0, le=10.0)


class EarlyStoppingParams(Section):
    patience: Int = Field(ge=0)
    min_delta: Float = Field(ge=0.0)


class DistillParams(Section):
    # The teachers: "none", or a model section whose model and recipe the teacher stage trains.
    teacher: Literal["none", "cnn"]
    weight: Float = Field(ge=0.0, le=1.0)
    temperature: Float = Field(gt=0.0, le=100.0)


class TrainParams(Section):
    epochs: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: Float = Field(gt=0.0)
    momentum: Probability
    nesterov: StrictBool
    weight_decay: Float = Field(ge=0.0)
    scheduler: Literal["onecycle", "cosine", "plateau", "step", "none"]
    warmup: Float = Field(gt=0.0, lt=1.0)
    step_size: Int = Field(ge=1)
    gamma: Float = Field(gt=0.0, le=1.0)
    plateau_patience: Int = Field(ge=0)
    label_smoothing: Probability
    ema: Probability
    augment: AugmentParams
    early_stopping: EarlyStoppingParams
    distill: DistillParams


class MLPParams(Section):
    hidden: tuple[Width, ...] = Field(min_length=1)
    dropout: Probability
    views: Literal[1, 5, 9]
    train: TrainParams  # the MLP's own training recipe


class CNNParams(Section):
    channels: tuple[Annotated[tuple[Width, ...], Field(min_length=1)], ...] = Field(min_length=1)
    dropout: Probability
    views: Literal[1, 5, 9]
    train: TrainParams  # the CNN's own training recipe


class GateParams(Section):
    alpha: Float = Field(gt=0.0, lt=1.0)  # McNemar's significance level per slice (divided by the classes per class)
    margin: Float = Field(ge=0.0, lt=0.1)  # share of a group's images the candidate may lose before the test counts


class EvaluateParams(Section):
    batch_size: Int = Field(ge=1)


class ExportParams(Section):
    formats: tuple[Literal["onnx", "pt2"], ...] = Field(min_length=1)
    opset: Int = Field(ge=18, le=23)
    parity_samples: Int = Field(ge=1)


class FeedbackParams(Section):
    use: StrictBool  # train on the admitted corrections; false trains on MNIST alone (the user split is still scored)
    defence: StrictBool  # false: naive ingest, every correction admitted (for comparison)
    user_split: Float = Field(ge=0.0, le=1.0)  # share of submitters held out for evaluation
    min_prob: Probability  # a label the answering model gave less probability ...
    top_k: Int = Field(ge=1, le=10)  # ... and that is not among its top_k guesses is implausible
    max_implausible: Probability  # a submitter whose disagreements are more often implausible loses all of them
    min_records: Int = Field(ge=1)  # ... once they have at least this many disagreements
    trusted_reviews: Int = Field(ge=1)  # accepted reviews (none rejected) that make a submitter trusted
    max_per_submitter: Int = Field(ge=1)  # records admitted per submitter, the earliest
    max_per_class: Int = Field(ge=1)  # disagreements admitted per submitter labelled any one digit
    anonymous_per_class: Int = Field(ge=0)  # disagreements admitted from all anonymous submitters, per digit
    repeat: Int = Field(ge=1, le=100)  # times each admitted correction is shown per epoch
    split_key: str = Field(min_length=1, max_length=100)  # keys the user split's hash: not the training seed


class Params(Section):
    # torch.manual_seed takes seeds below 2**64.
    seed: Int = Field(ge=0, lt=2**64)
    dataset: Literal[tuple(DATASETS)]  # type: ignore[valid-type]
    model: ModelName
    mlp: MLPParams
    cnn: CNNParams
    data: DataParams
    evaluate: EvaluateParams
    export: ExportParams
    gate: GateParams
    feedback: FeedbackParams

    @property
    def model_params(self) -> MLPParams | CNNParams:
        """The selected model's section (`mlp:` or `cnn:`)."""
        return getattr(self, self.model)

    @property
    def train(self) -> TrainParams:
        """The selected model's training recipe (`mlp.train` or `cnn.train`): each model is
        trained with its own, so `dvc exp run -S model=cnn` uses the CNN's."""
        return self.model_params.train

    @property
    def teacher(self) -> str:
        """The selected model's teacher (`<model>.train.distill.teacher`): "none", or the section
        (`cnn`) whose model and recipe the teacher stage trains for it."""
        return self.train.distill.teacher

    @property
    def teacher_params(self) -> Params:
        """These params with the teacher's section selected: `model` is the teacher, `train` its recipe."""
        if self.teacher == "none":
            raise ValueError(f"{self.model}.train.distill.teacher is none: there is no teacher")
        return self.model_copy(update={"model": self.teacher})

    def with_train(self, **changes: Any) -> Params:
        """A copy whose selected model's recipe has `changes` (tests, benchmarks)."""
        section = self.model_params
        return self.model_copy(
            update={self.model: section.model_copy(update={"train": section.train.model_copy(update=changes)})}
        )

    def model_kwargs(self) -> dict[str, Any]:
        """The selected model's architecture, as keyword arguments for `models.build_model`."""
        return self.model_params.model_dump(mode="json", exclude={"train"})

    def section(self, name: str) -> Any:
        """One top-level key as plain JSON/YAML values (lists, dicts, numbers, strings)."""
        value = getattr(self, name)
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


# ---------------------------------------------------------------- one-line messages

_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "float_type": "a finite number",
    "finite_number": "a finite number",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
}


def _key(loc: tuple[Any, ...]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _section_at(loc: tuple[Any, ...]) -> type[Section]:
    cls: type[Section] = Params
    for part in loc:
        cls = cls.model_fields[part].annotation  # type: ignore[assignment]
    return cls


def _expected(error: Mapping[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in _BOUNDS:
        name, symbol = _BOUNDS[kind]
        return f"a value {symbol} {ctx[name]}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx["expected"]) or re.findall(r"-?\d+", ctx["expected"])
        return "one of " + ", ".join(choices)
    if kind == "too_short":
        return f"a list of at least {ctx['min_length']} item(s)"
    return _EXPECTED.get(kind, error["msg"])


def describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as the one-line message users see."""
    loc = tuple(error["loc"])
    key = _key(loc)
    if error["type"] == "extra_forbidden":
        where = _key(loc[:-1]) or "the top level"
        allowed = ", ".join(_section_at(loc[:-1]).model_fields)
        return f"params.yaml: unknown key '{key}' (allowed in {where}: {allowed})"
    if error["type"] == "missing":
        return f"params.yaml: missing key '{key}'"
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"params.yaml: {key or 'the top level'} must be a mapping of keys, got {error['input']!r}"
    value = error["input"]
    value = list(value) if isinstance(value, tuple) else value
    return f"params.yaml: {key} = {value!r} is invalid: expected {_expected(error)}"


def parse_params(data: Any) -> Params:
    """Validate a loaded params mapping; raises ParamsError with a one-line message."""
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(describe(exc.errors()[0])) from None
    if len(set(params.export.formats)) != len(params.export.formats):
        raise ParamsError(
            f"params.yaml: export.formats = {list(params.export.formats)!r} is invalid: expected a list without repeats"
        )
    train_size = DATASETS[params.dataset].train_size
    if params.data.val_size >= train_size:
        raise ParamsError(
            f"params.yaml: data.val_size = {params.data.val_size!r} is invalid: "
            f"expected fewer than the {train_size} training images of {params.dataset}"
        )
    return params


def read_yaml(text: str) -> Any:
    """YAML text as DVC reads params files: ruamel.yaml, safe loader, YAML 1.2."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def _dump_yaml(data: Any) -> str:
    from ruamel.yaml import YAML

    out = io.StringIO()
    YAML(typ="safe", pure=True).dump(data, out)
    return out.getvalue()


def apply_overrides(params: Params, overrides: list[str]) -> Params:
    """What `dvc exp run -S key=value ...` does to params.yaml (DVC's code, Hydra's grammar): benchmarks, tests."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(_dump_yaml(params.model_dump(mode="json")))
        try:
            dvc_apply_overrides(path, overrides)
        except InvalidArgumentError as exc:
            cause = str(exc.__cause__ or exc)
            key = re.search(r"Could not override '([^']+)'\.\s+To append to your config use \+", cause)
            if key:  # Hydra's words for a key params.yaml does not have
                raise ParamsError(f"params.yaml: {key.group(1)} is not a key (-S {' '.join(overrides)})") from None
            raise ParamsError(f"params.yaml: -S {' '.join(overrides)}: {' '.join(cause.split())}") from None
        return load_params(path)


def load_params(path: str | Path = "params.yaml") -> Params:
    from ruamel.yaml import YAMLError

    path = Path(path)
    try:
        data = read_yaml(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: cannot read it: {exc}") from None
    except YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_params(data)
