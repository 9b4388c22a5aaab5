"""MLflow on the driver: every run the kit creates is created here.

Training: one parent run per study (:func:`start_parent_run`), one nested child
run per trial (:class:`TrialLogger`). Analyses (ablation, intervention,
dissection): one finished run each (:func:`log_analysis_run`), tagged ``kind``,
linked to the checkpoint's run and nested under its study.

Only the driver writes to MLflow (sqlite locks under many writers). Trials are
logged by :class:`TrialLogger`, a Tune callback, so a single ``study train`` and
every sweep trial land in MLflow the same way:

* params: the trial's whole resolved config, dotted keys (``train.lr``);
* metrics: every ``split/name`` key each epoch, with ``step = epoch``; an epoch
  already logged for a trial is never logged again (a resumed driver replays none);
* artifact: the final checkpoint (``checkpoint/checkpoint.pt``), or its URI as
  the tag ``checkpoint_uri`` when storage is remote;
* tags: ``mlflow.parentRunId``, ``trial_id``, ``status``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from study.config import StudyConfig

if TYPE_CHECKING:
    from study.sources import Source

CHECKPOINT_PATH_KEY = "checkpoint_path"  # ray.tune.integration.ray_train.CHECKPOINT_PATH_KEY
PARENT_TAG = "mlflow.parentRunId"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def client(cfg: StudyConfig):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    return MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)


def experiment_id(cfg: StudyConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(cfg.tracking.experiment)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def start_parent_run(cfg: StudyConfig, kind: str, name: str, tags: dict[str, str] | None = None) -> str:
    """Create the study's parent run; returns its id."""
    c = client(cfg)
    all_tags = {"study.kind": kind, "git_commit": git_commit(), "command": " ".join(sys.argv), **(tags or {})}
    run = c.create_run(experiment_id(cfg), run_name=name, tags=all_tags)
    c.log_batch(run.info.run_id, params=_params(flatten(cfg.dump())))
    return run.info.run_id


def find_parent_run(cfg: StudyConfig, name: str) -> str:
    """The parent run of study ``name`` (tag ``study.name``)."""
    from trainables.errors import ConfigError

    c = client(cfg)
    runs = c.search_runs([experiment_id(cfg)], filter_string=f"tags.`study.name` = '{name}'")
    if not runs:
        raise ConfigError(
            f"no MLflow parent run for '{name}' in experiment '{cfg.tracking.experiment}' at {cfg.tracking.mlflow_uri}"
        )
    return runs[0].info.run_id


def _params(flat: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in flat.items()]


def is_metric(key: str, value: Any) -> bool:
    return ("/" in key or key == "lr") and isinstance(value, (int, float)) and not isinstance(value, bool)


class TrialLogger(Callback):
    """Tune callback: trial runs in MLflow nested under ``parent_run_id``, plus a progress line per epoch."""

    def __init__(self, cfg: StudyConfig, parent_run_id: str, resolve, quiet: bool = False):
        self.cfg, self.parent_run_id, self.resolve, self.quiet = cfg, parent_run_id, resolve, quiet
        self._connect()

    def _connect(self) -> None:
        self.client = client(self.cfg)
        self.experiment_id = experiment_id(self.cfg)
        self.runs: dict[str, str] = {}
        self.logged: dict[str, set[int]] = {}
        self.checkpoints: dict[str, str] = {}
        self._epochs: dict[str, int] = {}  # per trial, resolved once (not re-validated every epoch)

    # Tune pickles its run config (callbacks included) for Tuner.restore: keep only
    # the settings; a restored logger reconnects and finds its runs by their tags.
    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "parent_run_id": self.parent_run_id, "resolve": self.resolve, "quiet": self.quiet}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._connect()

    # -- helpers
    def _run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.trial_id = '{trial.trial_id}'",
        )
        if existing:  # a resumed driver continues the trial's run
            run_id = existing[0].info.run_id
            history = self.client.get_metric_history(run_id, "test/acc")
            self.logged[trial.trial_id] = {m.step for m in history}
        else:
            resolved = self.resolve(trial.config)
            self._epochs[trial.trial_id] = resolved["train"]["epochs"]
            tags = {PARENT_TAG: self.parent_run_id, "trial_id": trial.trial_id, "status": "running"}
            method = (trial.config.get("search") or {}).get("method")
            if method is not None:
                tags["method"] = str(method)
            run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}", tags=tags)
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=_params(flatten(resolved)))
            self.logged[trial.trial_id] = set()
        self.runs[trial.trial_id] = run_id
        return run_id

    def _trial_epochs(self, trial) -> int:
        if trial.trial_id not in self._epochs:
            self._epochs[trial.trial_id] = self.resolve(trial.config)["train"]["epochs"]
        return self._epochs[trial.trial_id]

    # -- Tune hooks (driver side)
    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self._run_for(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if CHECKPOINT_PATH_KEY in result:
            self.checkpoints[trial.trial_id] = result[CHECKPOINT_PATH_KEY]
        if epoch in self.logged[trial.trial_id]:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, epoch) for k, v in result.items() if is_metric(k, v)]
        self.client.log_batch(run_id, metrics=metrics)
        self.logged[trial.trial_id].add(epoch)
        if not self.quiet:
            epochs = self._trial_epochs(trial)
            pen = f"  penalty {result['train/penalty']:.4f}" if result.get("train/penalty") else ""
            val = f"val/acc {result['val/acc']:.1%}  " if "val/acc" in result else ""
            print(
                f"[{trial.trial_id}] epoch {epoch + 1}/{epochs}  train/loss {result['train/loss']:.3f}  "
                f"train/acc {result['train/acc']:.1%}  {val}test/acc {result['test/acc']:.1%}{pen}  "
                f"{result['time/epoch_s']:.1f} s ({result['time/images_per_s']:.0f} img/s)",
                flush=True,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        path = self.checkpoints.get(trial.trial_id)
        if path:
            self.client.set_tag(run_id, "checkpoint_uri", path)
            if "://" not in path:  # remote storage: the tag is the reference, no copy
                self.client.log_artifacts(run_id, path, artifact_path="checkpoint")
        epochs = self._trial_epochs(trial)
        stopped_early = len(self.logged.get(trial.trial_id, ())) < epochs
        self.client.set_tag(run_id, "status", "stopped_early" if stopped_early else "finished")
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self.client.set_tag(run_id, "status", "failed")
        self.client.set_terminated(run_id, "FAILED")


def ui_hint(cfg: StudyConfig) -> str:
    uri = cfg.tracking.mlflow_uri
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def log_analysis_run(
    cfg: StudyConfig,
    source: Source,  # study.sources.Source
    *,
    kind: str,
    name: str,
    metrics: dict[str, float],
    params: dict[str, Any],
    files: Sequence[Path],
    tags: dict[str, str] | None = None,
) -> str:
    """One finished MLflow run with ``files`` as artifacts, linked to the checkpoint's run and its study."""
    from mlflow.entities import Metric, Param, RunTag

    c = client(cfg)
    tags = {"kind": kind, "checkpoint": source.ref, "checkpoint_sha256": source.fingerprint,
            "git_commit": git_commit(), "command": " ".join(sys.argv), **(tags or {})}
    if source.run_id:
        tags["source_run_id"] = source.run_id
    if source.parent_run_id:
        tags[PARENT_TAG] = source.parent_run_id
    run_id = c.create_run(experiment_id(cfg), run_name=name, tags=tags).info.run_id
    flat = {**flatten(cfg.dump()), **params}
    c.log_batch(
        run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)[:6000]) for k, v in flat.items()],
        tags=[RunTag("mlflow.note.content", f"{kind} of checkpoint {source.ref}")],
    )
    for f in files:
        c.log_artifact(run_id, str(f))
    c.set_terminated(run_id, "FINISHED")
    return run_id
