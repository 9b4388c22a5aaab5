"""Which checkpoint a command analyses, and with which config.

Used by ``study ablate``, ``study intervene`` and ``study dissect`` alike:

* :func:`resolve_source` finds the checkpoint: a ``checkpoint.pt`` path (or a
  folder holding one), or an MLflow run id whose ``checkpoint/checkpoint.pt``
  artifact is downloaded (or, with remote Ray storage, the file its
  ``checkpoint_uri`` tag names, fetched from the bucket); a path is linked to the trial run that saved it
  (:func:`link_source_run`, by its ``checkpoint_uri`` tag).
* :func:`study_config` takes data and model from the checkpoint's own config
  (the images it was trained for), the other sections from ``--config`` (or the
  checkpoint's config), then ``--set``; :func:`check_model` checks the weights
  against it (architecture, width, class count).
* :func:`prepare` does both for a CLI command, before Ray starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.evaluation import model_from_state_dict
from study.config import StudyConfig, apply_overrides, read_yaml, validate
from study.mlflow_store import PARENT_TAG, client
from study.mlflow_ui import check_tracking
from study.runtime import with_absolute_paths
from study.storage import fetch, is_remote
from trainables.checkpoint import load_checkpoint
from trainables.errors import CheckpointError, ConfigError
from trainables.models import scaled_width

__all__ = ["CHECKPOINT_ARTIFACT", "Source", "check_model", "expected_architecture", "link_source_run", "prepare",
           "resolve_source", "study_config"]

CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"
_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})(?:/.*)?$")


@dataclass
class Source:
    """A checkpoint to analyse and where it came from.

    Attributes:
        checkpoint: the loaded dict (``model``, ``config``, ...) or a bare state dict.
        ref: what the user gave (a path or a run id), for messages and tags.
        path: the local file read.
        run_id: the MLflow run the checkpoint belongs to, when known.
        parent_run_id: that run's parent (the study), when it has one.
        name: short name for output folders (the run id, else the file's name).
        fingerprint: sha256 of the file (keys resumable parts to these exact weights).
        run_store: the tracking URI the run id was found in (None for a path).
    """

    checkpoint: dict
    ref: str
    path: Path
    run_id: str | None
    parent_run_id: str | None
    name: str
    fingerprint: str
    run_store: str | None = None

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.checkpoint.get("model", self.checkpoint)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{self.ref}: its 'model' entry is a {type(sd).__name__}, not a state dict")
        return sd

    @property
    def config(self) -> dict | None:
        """The training run's ``StudyConfig.dump()``, or None for a bare state dict."""
        cfg = self.checkpoint.get("config")
        return cfg if isinstance(cfg, dict) and cfg else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tracking_only(config_path: str | Path | None, overrides: Sequence[str] | None) -> StudyConfig:
    """Defaults plus the file's and ``--set``'s tracking section: enough to find a run before the checkpoint."""
    raw = read_yaml(config_path) if config_path is not None else {}
    tracking = [o for o in overrides or [] if o.strip().startswith("tracking.")]
    return validate(apply_overrides({"tracking": raw.get("tracking", {})}, tracking))


def _mlflow_run(cfg: StudyConfig, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client(cfg).get_run(run_id)
    except MlflowException:
        raise CheckpointError(
            f"there is no MLflow run {run_id} at {cfg.tracking.mlflow_uri}; pass a checkpoint.pt path, or set "
            "tracking.mlflow_uri to the store that holds the run"
        ) from None


def _download_checkpoint(cfg: StudyConfig, run, dst: Path) -> Path:
    """The run's ``checkpoint/checkpoint.pt`` artifact, downloaded to ``dst``; with remote Ray storage
    (no artifact, the tag ``checkpoint_uri`` = ``s3://...``) the file is fetched from there."""
    run_id = run.info.run_id
    c = client(cfg)
    names = [a.path for a in c.list_artifacts(run_id, "checkpoint")]
    if CHECKPOINT_ARTIFACT not in names:
        uri = run.data.tags.get("checkpoint_uri")
        if uri and is_remote(uri):
            return fetch(f"{uri.rstrip('/')}/checkpoint.pt", dst / "checkpoint.pt")
        if uri and (Path(uri) / "checkpoint.pt").is_file():
            return Path(uri) / "checkpoint.pt"
        where = f"; its checkpoint is at {uri}: copy checkpoint.pt from there and pass its path" if uri else ""
        raise CheckpointError(f"MLflow run {run_id} has no {CHECKPOINT_ARTIFACT} artifact{where}")
    return Path(c.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dst)))


def _run_for_file(cfg: StudyConfig, path: Path) -> str | None:
    """The MLflow trial run whose ``checkpoint_uri`` tag is this file's folder, if the tracking store has one."""
    folder = str(path.resolve().parent)
    if "'" in folder:
        return None
    c = client(cfg)
    experiments = [e.experiment_id for e in c.search_experiments()]
    if not experiments:
        return None
    runs = c.search_runs(experiments, filter_string=f"tags.checkpoint_uri = '{folder}'", max_results=1)
    return runs[0].info.run_id if runs else None


def link_source_run(source: Source, cfg: StudyConfig) -> None:
    """For a checkpoint given by path: find the trial run that saved it in ``cfg``'s store, to link to it."""
    run_id = _run_for_file(cfg, source.path)
    if run_id:
        source.run_id = run_id
        source.parent_run_id = client(cfg).get_run(run_id).data.tags.get(PARENT_TAG)
        source.name = run_id[:12]


def resolve_source(
    ref: str | Path,
    *,
    config_path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    workdir: Path,
) -> Source:
    """Load the checkpoint ``ref`` names: a ``checkpoint.pt`` (or a folder holding one) or an MLflow run id.

    A run's artifact is downloaded into ``workdir``; the run is looked up in the
    tracking store of ``--config``/``--set`` (default ``sqlite:///mlflow.db``).
    For a path, :func:`link_source_run` later finds the run that saved it.
    """
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"
    run = None
    if not path.exists() and (m := _RUN_ID.match(text)):
        tracking = _tracking_only(config_path, overrides)
        run = _mlflow_run(tracking, m.group(1))
        path = _download_checkpoint(tracking, run, workdir)
    elif not path.exists():
        raise CheckpointError(f"no checkpoint file at {path} (and '{text}' is not an MLflow run id)")
    checkpoint = load_checkpoint(path)
    run_id = run.info.run_id if run is not None else None
    parent = run.data.tags.get(PARENT_TAG) if run is not None else None
    store = tracking.tracking.mlflow_uri if run is not None else None
    if run_id:
        name = run_id[:12]
    elif path.stem == "checkpoint" and path.parent.parent.name:
        name = f"{path.parent.parent.name}-{path.parent.name}"  # <storage>/train-<trial>/checkpoint_<time>/
    else:
        name = path.stem
    return Source(checkpoint, text, path, run_id, parent, name, _sha256(path), store)


def study_config(
    source: Source,
    config_path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    tracking_uri: str | None = None,
) -> StudyConfig:
    """The config to analyse ``source`` with.

    ``data`` and ``model`` come from the checkpoint's config (what it was
    trained on); the other sections from ``config_path`` if given, else from
    the checkpoint's config; ``overrides`` (``--set``) apply last. A bare state
    dict (no config) takes everything from ``config_path``/defaults.
    ``tracking_uri`` pins the store (where a run id was found).
    """
    own = source.config
    raw = read_yaml(config_path) if config_path is not None else copy.deepcopy(own or {})
    if own is not None:
        for section in ("data", "model"):
            if section in own:
                raw[section] = copy.deepcopy(own[section])
        if "data" in own and "val_fraction" not in own["data"]:
            raw["data"]["val_fraction"] = 0.0  # trained before validation splits existed: on every train image
    if tracking_uri is not None:
        raw.setdefault("tracking", {})["mlflow_uri"] = tracking_uri
    return validate(apply_overrides(raw, list(overrides or [])))


def expected_architecture(cfg: StudyConfig) -> dict[str, Any]:
    """What the weights must be (checked by :func:`analysis.evaluation.model_from_state_dict`)."""
    return {"variant": cfg.model.variant, "batch_norm": cfg.model.batch_norm, "num_classes": cfg.num_classes}


def check_model(source: Source, cfg: StudyConfig) -> torch.nn.Sequential:
    """The checkpoint's model on the CPU, checked against ``cfg`` (architecture, width, class count)."""
    model = model_from_state_dict(source.state_dict, device="cpu", **expected_architecture(cfg))
    have, want = model.conv1_1.out_channels, scaled_width(64, cfg.model.width)
    if have != want:
        raise CheckpointError(
            f"the checkpoint is a VGG-16 of width {have / 64:g} ({have} conv1_1 channels), but model.width = "
            f"{cfg.model.width:g} ({want}) was expected (a checkpoint of another model?)"
        )
    return model



def _units_option(units: str | None) -> list[int] | None:
    if units is None:
        return None
    try:
        return [int(u) for u in units.split(",") if u.strip()]
    except ValueError:
        raise ConfigError(f"--units expects comma-separated unit indices such as 0,5,9, got '{units}'") from None


def prepare(
    checkpoint: str,
    config_path: str | Path | None,
    overrides: Sequence[str] | None,
    *,
    layer: str | None,
    units: str | None,
    workdir: Path,
    extra: Sequence[str] = (),
) -> tuple[StudyConfig, Source]:
    """Resolve the checkpoint and the config for a CLI command (everything checked before Ray starts)."""
    sets = list(overrides or [])
    if layer is not None:
        sets.append(f"ablation.layer={layer}")
    parsed = _units_option(units)
    if parsed is not None:
        sets.append(f"ablation.units={json.dumps(parsed)}")
    sets += list(extra)
    check_tracking(_tracking_only(config_path, sets))
    source = resolve_source(checkpoint, config_path=config_path, overrides=sets, workdir=workdir)
    cfg = with_absolute_paths(study_config(source, config_path, sets, tracking_uri=source.run_store))
    if source.run_id is None:
        link_source_run(source, cfg)
    return cfg, source


