"""The typed study configuration: one pydantic model per section.

Defaults live here and only here. A YAML file plus ``--set a.b=value`` overrides
is validated in one go; the first problem becomes a :class:`ConfigError` whose
single sentence names the field and what is allowed, e.g.::

    regularization.focused_dropout.par_rate = 2 is out of range; allowed: [0, 1]
    unknown key 'train.epoch' (did you mean 'epochs'?)

Sections: data, model, regularization (focused_dropout, dropout,
gradient_penalty), train, sweep, ablation, dissection, tracking, ray.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from study.jobs import anchored
from trainables.datasets import NUM_CLASSES
from trainables.errors import ConfigError, LayerNameError
from trainables.models import check_layer_name, layer_names

__all__ = [
    "ConfigError", "StudyConfig", "load_config", "parse_overrides", "set_path", "DATASET_CLASSES",
    # the worker-side sections, defined in trainables.config
    "AblationConfig", "DataConfig", "DissectionConfig", "DropoutConfig", "FocusedDropoutConfig",
    "GradientPenaltyConfig", "ModelConfig", "RegularizationConfig", "TrainConfig",
]

# Classes per dataset (derived from the registry in trainables.datasets); model.num_classes defaults to this.
DATASET_CLASSES = NUM_CLASSES


from trainables.config import (  # re-exported: the sections every caller knows from here
    AblationConfig,
    DataConfig,
    DissectionConfig,
    DropoutConfig,
    FocusedDropoutConfig,
    GradientPenaltyConfig,
    ModelConfig,
    RegularizationConfig,
    Section,
    TrainConfig,
    WorkerSections,
)


class Distribution(Section):
    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None


class SweepConfig(Section):
    num_samples: int = Field(4, ge=1)  # trials (per grid point when grid is set)
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # ASHA: epochs before a trial may be stopped
    reduction_factor: float = Field(2.0, gt=1)  # ASHA: keep 1/reduction_factor per rung
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: what the cluster fits
    seed: int = 0  # Optuna sampler seed
    space: dict[str, Distribution] = {}  # dotted field path -> distribution (Optuna search)
    grid: dict[str, list[Any]] = {}  # dotted field path -> values (grid, no Optuna)
    methods: dict[str, dict[str, Any]] = {}  # named bundles of overrides, one grid axis (Table 2)
    seeds: list[int] = []  # a grid axis over train.seed (Table 2's repeats)
    name: str | None = None  # sweep name in storage (default: sweep-<timestamp>)
    metric: Literal["val/acc", "val/loss"] = "val/acc"  # what Optuna, ASHA and the best trial are chosen on

    @property
    def mode(self) -> str:
        """``max`` for an accuracy, ``min`` for a loss."""
        return "min" if self.metric.endswith("loss") else "max"


class TrackingConfig(Section):
    mlflow_uri: str = "sqlite:///mlflow.db"  # MLflow >= 3.13 refuses ./mlruns by default
    experiment: str = Field("unitstudy", min_length=1)


class RayConfig(Section):
    storage_path: str = "ray_results"  # shared (s3://, gs://, NFS) on multi-node clusters
    address: str | None = None  # None: start a local cluster; "auto": join the running one
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs of a local cluster
    worker_logs: bool = False  # stream Ray workers' own logs to the terminal (errors are shown either way)
    scale_up_timeout_s: float = Field(900.0, ge=0)  # autoscaling clusters: how long to wait for nodes to start


class StudyConfig(WorkerSections):
    """The whole configuration: the worker sections (:mod:`trainables.config`) plus sweep, tracking, ray."""

    sweep: SweepConfig = Field(default_factory=SweepConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes or DATASET_CLASSES[self.data.name]

    @model_validator(mode="after")
    def _cross_checks(self) -> StudyConfig:
        if self.model.variant == "cifar" and self.data.image_size != 32:
            raise ValueError(
                f"model.variant = 'cifar' takes 32 px images but data.image_size = {self.data.image_size}; "
                "set data.image_size=32 or model.variant=places365"
            )
        if self.train.sync_batchnorm and self.regularization.gradient_penalty.lam > 0 and (
            self.regularization.gradient_penalty.method == "double_backprop"
        ):
            raise ValueError(
                "train.sync_batchnorm cannot be combined with the double_backprop gradient penalty "
                "(SyncBatchNorm's backward is not itself differentiable); use "
                "regularization.gradient_penalty.method=finite_difference or turn sync_batchnorm off"
            )
        if self.train.compile == "on" and self.regularization.gradient_penalty.lam > 0 and (
            self.regularization.gradient_penalty.method == "double_backprop"
        ):
            raise ValueError(
                "train.compile=on cannot be combined with the double_backprop gradient penalty (torch.compile "
                "does not support double backward); use train.compile=auto or off, or "
                "regularization.gradient_penalty.method=finite_difference"
            )
        names = layer_names(self.model.variant, self.model.batch_norm)
        trunk = names[: names.index("pool5") + 1]
        for path, value in (
            ("regularization.focused_dropout.site", self.regularization.focused_dropout.site),
            ("ablation.layer", self.ablation.layer),
            ("dissection.layer", self.dissection.layer),
        ):
            try:
                check_layer_name(value, trunk, what=f"layer for {path}")
            except LayerNameError as exc:
                raise ValueError(str(exc)) from None
        for path, dist in self.sweep.space.items():
            _check_distribution(path, dist)
        for path, values in self.sweep.grid.items():
            _field_for_path(path)
            if not values:
                raise ValueError(f"sweep.grid.{path} is empty; give at least one value")
        for method, overrides in self.sweep.methods.items():
            for path in overrides:
                try:
                    _field_for_path(path)
                except ValueError as exc:
                    raise ValueError(f"sweep.methods.{method}: {exc}") from None
        if self.sweep.space and (self.sweep.grid or self.sweep.methods or self.sweep.seeds):
            raise ValueError(
                "sweep.space (an Optuna search) cannot be combined with sweep.grid, sweep.methods or sweep.seeds "
                "(a grid); Optuna refuses grid_search, so use one or the other"
            )
        return self

    def dump(self) -> dict[str, Any]:
        """Plain JSON-able dict with YAML key spellings (``lambda``)."""
        return self.model_dump(mode="json", by_alias=True)


# ----------------------------------------------------------------------------- search space


def _field_for_path(path: str) -> tuple[type, Any]:
    """(annotation, FieldInfo) of a leaf field addressed by dotted path; ValueError if none."""
    model: type[BaseModel] = StudyConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = _fields_by_key(model)
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean '{'.'.join(parts[:i] + [close[0]])}'?)" if close else ""
            raise ValueError(f"search space path '{path}' is not a config field{hint}")
        info = fields[part]
        ann = info.annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                raise ValueError(f"search space path '{path}' goes below the leaf field '{'.'.join(parts[: i + 1])}'")
            model = ann
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            raise ValueError(f"search space path '{path}' names a whole section, not a field")
    return ann, info


def _check_distribution(path: str, dist: Distribution) -> None:
    ann, _ = _field_for_path(path)
    where = f"sweep.space.{path}"
    if dist.type == "choice":
        if not dist.values:
            raise ValueError(f"{where}: a choice needs a non-empty 'values' list")
        return
    if ann not in (int, float):
        raise ValueError(f"{where}: a {dist.type} distribution needs a numeric field, but '{path}' is not numeric")
    if dist.low is None or dist.high is None:
        raise ValueError(f"{where}: a {dist.type} distribution needs both 'low' and 'high'")
    if not (math.isfinite(dist.low) and math.isfinite(dist.high)) or dist.low > dist.high:
        raise ValueError(f"{where}: low = {dist.low} must not exceed high = {dist.high}")
    if dist.type == "loguniform" and dist.low <= 0:
        raise ValueError(f"{where}: loguniform needs low > 0, got low = {dist.low}")
    if dist.type == "int" and (dist.low != int(dist.low) or dist.high != int(dist.high)):
        raise ValueError(f"{where}: an int distribution needs whole-number bounds")
    if dist.type == "int" and ann is not int:
        raise ValueError(f"{where}: an int distribution needs an integer field, but '{path}' is a float")


# ----------------------------------------------------------------------------- loading


def _fields_by_key(model: type[BaseModel]) -> dict[str, Any]:
    """Fields keyed by their YAML spelling (alias when set)."""
    return {(info.alias or name): info for name, info in model.model_fields.items()}


def _leaf_info(loc: tuple) -> Any:
    model: Any = StudyConfig
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return info
        info = _fields_by_key(model).get(str(part))
        if info is None:
            return None
        model = info.annotation
    return info


def _allowed_range(info: Any) -> str | None:
    lo = hi = None
    lo_open = hi_open = False
    for m in getattr(info, "metadata", []):
        if isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, annotated_types.Le):
            hi = m.le
        elif isinstance(m, annotated_types.Lt):
            hi, hi_open = m.lt, True
    if lo is None and hi is None:
        return None
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, int) and err["type"] != "extra_forbidden"))
    path = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _leaf_info(loc[:-1])
        parent_model = parent.annotation if parent is not None else StudyConfig
        known = list(_fields_by_key(parent_model)) if isinstance(parent_model, type) else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{path}'{hint}; known keys here: {', '.join(known)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        allowed = _allowed_range(_leaf_info(loc))
        return f"{path} = {value!r} is out of range; allowed: {allowed}"
    if kind == "literal_error":
        return f"{path} = {value!r} is not allowed; {err['msg'][0].lower()}{err['msg'][1:]}"
    if kind == "value_error" and "gamma_range" in err["msg"]:
        return f"{path} = {list(value)} is invalid; need 0 < lo <= hi < 1 (the range gamma is drawn from)"
    if kind == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return msg if not path else f"{path}: {msg}"
    if kind == "missing":
        return f"{path} is required"
    return f"{path} = {value!r} is invalid: {err['msg'][0].lower()}{err['msg'][1:]}"


def validate(raw: dict[str, Any]) -> StudyConfig:
    """Validate a raw dict; one ConfigError sentence for the first problem. Inside a Ray job, relative locations
    resolve under the job home, not in the job's temporary working directory (:func:`study.jobs.anchored`)."""
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ConfigError(_describe(errors[0]) + more) from None
    return anchored(cfg)


def text_field(parts: list[str]) -> tuple[bool, bool]:
    """(the field at ``parts`` takes text, it may also be null): a ``str`` or a ``Literal`` of strings."""
    model: Any = StudyConfig
    info = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False, False
        info = _fields_by_key(model).get(part)
        if info is None:
            return False, False
        model = info.annotation
    args = typing.get_args(model) if typing.get_origin(model) in (typing.Union, types.UnionType) else (model,)
    nullable = type(None) in args
    kinds = [a for a in args if a is not type(None)]

    def text(a) -> bool:
        return a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))

    return bool(kinds) and all(text(a) for a in kinds), nullable


def parse_overrides(overrides: list[str] | None) -> list[tuple[list[str], Any]]:
    """``["a.b=1", ...]`` -> ``[(["a", "b"], 1), ...]``.

    A text field (``str`` or a choice of strings: ``train.amp``, ``data.root``,
    ``tracking.experiment``...) receives exactly what was typed, so YAML 1.1's
    ``off``/``on``/``yes``/``no`` stay words and ``1.0e-3`` or ``007`` stay text;
    quotes are removed, and ``null`` / ``~`` unset a field that may be empty
    (``ray.address=null``). Every other value parses as YAML (numbers, booleans,
    lists, mappings).
    """
    parsed = []
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key.path=value, got '{item}'")
        path = key.strip().split(".")
        is_text, nullable = text_field(path)
        stripped = text.strip()
        if is_text and nullable and stripped in ("null", "~", "Null", "NULL"):
            value = None
        elif is_text and len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
            value = stripped[1:-1]
        elif is_text:
            value = text
        else:
            try:
                value = yaml.safe_load(text) if stripped else ""
            except yaml.YAMLError:
                value = text
        parsed.append((path, value))
    return parsed


def set_path(raw: dict[str, Any], path: str | list[str], value: Any, *, what: str = "--set") -> None:
    """Set the dotted ``path`` of a raw config dict to ``value``, creating sections on the way.

    The one setter behind ``--set a.b=value`` and a sweep trial's sampled values
    (``study.train.resolve_trial_config``); the result is validated afterwards.
    """
    parts = path.split(".") if isinstance(path, str) else list(path)
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what} {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for path, value in parse_overrides(overrides):
        set_path(raw, path, value)
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Load ``path`` (or the defaults), apply ``--set`` overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    return validate(apply_overrides(raw, overrides))
