"""``study train``: one training run as a one-trial Tune study over a Ray Train TorchTrainer.

The pattern (DESIGN.md; ``Tuner(TorchTrainer)`` fails on Ray 2.60): the worker
function :func:`trainables.loop.train_fn_per_worker` runs under a
``TorchTrainer`` that a Tune *function trainable* (:func:`trial_fn`) builds and
fits; the ``Tuner`` runs that function. ``study train`` is a sweep of one trial,
so a single run is logged exactly like a sweep trial (:mod:`study.tracking`).

A trial's config is ``{"config": StudyConfig.dump(), "search": {dotted.path: value},
"storage_path": str}``; :func:`resolve_trial_config` applies the search values
and validates the result again.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.config import StudyConfig, set_path, validate
from study.headline import SELECTED, selected_metrics
from study.runtime import (
    TRIAL_DRIVER_CPUS,
    check_cluster_fits,
    check_local_prerequisites,
    init_ray,
    storage_path,
    with_absolute_paths,
    worker_resources,
)
from study.storage import as_uri, is_remote, latest_folder
from study.tracking import TrialLogger, start_parent_run
from trainables.errors import ConfigError, UnitstudyError
from trainables.loop import STOP_ENV


class TrainingFailed(UnitstudyError):
    """A trial ended in an error after Ray Train's retries were used up."""


def resolve_trial(trial_config: dict[str, Any]) -> StudyConfig:
    """The trial's validated config: base config with the trial's search values set.

    The search key ``method`` names a bundle in ``sweep.methods`` whose overrides
    are applied first; every other key is a dotted field path (the same setter
    as ``--set``, :func:`study.config.set_path`).
    """
    raw = copy.deepcopy(trial_config["config"])
    search = dict(trial_config.get("search") or {})
    method = search.pop("method", None)
    if method is not None:
        for path, value in raw["sweep"]["methods"][method].items():
            set_path(raw, path, value, what="sweep.methods")
    for path, value in search.items():
        set_path(raw, path, value, what="sweep.space")
    return validate(raw)


def resolve_trial_config(trial_config: dict[str, Any]) -> dict[str, Any]:
    """:func:`resolve_trial` as a plain dump (what MLflow params and the trial list hold)."""
    return resolve_trial(trial_config).dump()


def scaling_config(cfg: StudyConfig):
    """The trial's ``ray.train.ScalingConfig``: ``train.num_workers`` workers, each :func:`worker_resources`.

    With ``train.gpus_per_worker`` below 1 several trials' workers share one GPU
    (Ray's fractional GPUs: each worker sees the whole device and its memory,
    so the trials must fit in it together).
    """
    import ray.train

    return ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                   resources_per_worker=worker_resources(cfg))


def trial_fn(trial_config: dict[str, Any]) -> None:
    """Tune function trainable: build and fit this trial's TorchTrainer."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainables.loop import train_fn_per_worker

    cfg = resolve_trial(trial_config)  # validated once here; the workers rebuild their typed sections once
    dump = cfg.dump()
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": dump, "num_classes": cfg.num_classes,
                           "test_stop": trial_config.get("test_stop"),
                           "full_test_epochs": trial_config.get("full_test_epochs") or []},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=trial_config["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()


@dataclass
class StudyResult:
    parent_run_id: str
    experiment_path: str
    trials: list[dict[str, Any]]  # trial_id, status, metrics, run_id, checkpoint_path, error
    best: dict[str, Any] | None = None  # the trial chosen on sweep.metric (validation), None when none could be


def choose_best(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial without error whose last reported ``metric`` is best (``mode`` max or min); None if none has it.

    Only validation metrics may choose: the test split is for reporting.
    """
    if not metric.startswith("val/"):
        raise ConfigError(f"trials are chosen on a validation metric (val/...), not '{metric}'")
    candidates = [t for t in trials if t["error"] is None and metric in t["metrics"]]
    if not candidates:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(candidates, key=lambda t: sign * t["metrics"][metric])


def _log_best(client, parent: str, best: dict[str, Any] | None, cfg: StudyConfig) -> None:
    """The chosen trial's headline numbers on the parent run (``selected/*``, the same values as on the trial
    run: :mod:`study.headline`), and how it was chosen."""
    if best is None:
        why = ("no validation split (data.val_fraction = 0)" if cfg.data.val_fraction == 0
               else f"no trial reported {cfg.sweep.metric}")
        client.set_tag(parent, "best_trial", f"not chosen: {why}")
        return
    logged = client.get_run(best["run_id"]).data.metrics if best["run_id"] else {}
    selected = {k: v for k, v in logged.items() if k in SELECTED}
    if not selected and "epoch" in best["metrics"]:  # no trial run to read: its last reported epoch
        epochs = best["config"]["train"]["epochs"] if best.get("config") else None
        selected = selected_metrics([best["metrics"]], epochs)
    for key, value in selected.items():
        client.log_metric(parent, key, value)
    client.set_tag(parent, "best_trial_id", str(best["trial_id"]))
    client.set_tag(parent, "best_chosen_on", cfg.sweep.metric)
    if best["run_id"]:
        client.set_tag(parent, "best_run_id", best["run_id"])
    for path, value in best["search"].items():
        client.set_tag(parent, f"best.{path}", str(value))


def run_trials(
    cfg: StudyConfig,
    *,
    kind: str,
    param_space: dict[str, Any],
    tune_config: Callable[[], Any],
    name: str | None = None,
    parent_tags: dict[str, str] | None = None,
    quiet: bool = False,
    resume: bool = False,
) -> StudyResult:
    """Run (or, with ``resume``, continue) a Tuner over :func:`trial_fn`, logged under one MLflow parent run.

    ``tune_config`` is called once Ray is up (it may read the cluster's size).
    The parent run carries the tag ``study.name`` = the Tune experiment name, which
    is how a resumed study finds it again.
    """
    import ray.tune

    from study.mlflow_store import client
    from study.mlflow_ui import check_tracking
    from study.tracking import find_parent_run

    check_local_prerequisites(cfg)
    check_tracking(cfg)
    storage = storage_path(cfg)
    init_ray(cfg)
    check_cluster_fits(cfg)
    trainable = ray.tune.with_resources(trial_fn, {"cpu": TRIAL_DRIVER_CPUS})
    if resume:
        name = name or latest_study(storage, kind)
        path = f"{storage}/{name}"
        if not ray.tune.Tuner.can_restore(path):
            raise ConfigError(f"there is no {kind} to resume at {path}")
        parent = find_parent_run(cfg, name)
        tuner = ray.tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        if not quiet:
            print(f"resuming {kind} {name} (MLflow parent run {parent})", flush=True)
    else:
        name = name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = start_parent_run(
            cfg, kind, name, tags={"study.name": name, "storage_path": storage, **(parent_tags or {})}
        )
        tuner = ray.tune.Tuner(
            trainable,
            param_space={**param_space, "storage_path": storage,
                         **({"test_stop": os.environ[STOP_ENV]} if os.environ.get(STOP_ENV) else {})},
            tune_config=tune_config(),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=storage,
                callbacks=[TrialLogger(cfg, parent, resolve_trial_config, quiet=quiet, kind=kind)],
                verbose=0,
            ),
        )
    # After a resume from remote storage Tune may not find a just-finished trial's result files yet and warns
    # "Failed to fetch metrics"; the trials' values are read back from MLflow below, the record.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    grid = tuner.fit()
    c = client(cfg)
    trials = []
    experiment = c.get_run(parent).info.experiment_id
    for result in grid:
        metrics = dict(result.metrics or {})
        # Tune puts trial_id in every result; the trial directory name carries it too
        # (after a resume Tune may not find a trial's result files for a moment).
        match = re.match(r"^trial_fn_([0-9a-f]+_\d+)_", Path(result.path).name) if result.path else None
        trial_id = metrics.get("trial_id") or (match.group(1) if match else None)
        runs = c.search_runs(
            [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.trial_id = '{trial_id}'"
        ) if trial_id else []
        history = c.get_metric_history(runs[0].info.run_id, "test/acc") if runs and "test/acc" not in metrics else []
        if history:  # the MLflow run is the record: take its last values (a trial that failed at once has none)
            metrics.update(runs[0].data.metrics)
            metrics["epoch"] = max(m.step for m in history) - 1  # steps count epochs from 1
            metrics["checkpoint_path"] = runs[0].data.tags.get("checkpoint_uri")
        trials.append(
            {
                "trial_id": trial_id,
                "config": resolve_trial_config(result.config) if result.config else None,
                "search": (result.config or {}).get("search", {}),
                "metrics": {k: v for k, v in metrics.items() if "/" in k or k == "epoch"},
                "error": None if result.error is None else str(result.error).strip().splitlines()[-1][:300],
                "checkpoint_path": as_uri(storage, metrics["checkpoint_path"]) if metrics.get("checkpoint_path")
                else None,
                "run_id": runs[0].info.run_id if runs else None,
            }
        )
    finished = [t for t in trials if t["error"] is None and "test/acc" in t["metrics"]]
    best = choose_best(trials, cfg.sweep.metric, cfg.sweep.mode)
    _log_best(c, parent, best, cfg)
    c.set_terminated(parent, "FINISHED" if len(finished) == len(trials) else "FAILED")
    return StudyResult(parent_run_id=parent, experiment_path=f"{storage}/{name}", trials=trials, best=best)


def latest_study(storage: str, kind: str) -> str:
    """Name of the ``<kind>-*`` experiment under ``storage`` (a folder or a bucket) whose ``tuner.pkl`` is newest."""
    if is_remote(storage):
        found = latest_folder(storage, f"{kind}-", "tuner.pkl")
    else:
        paths = [p for p in Path(storage).glob(f"{kind}-*") if (p / "tuner.pkl").exists()]
        found = max(paths, key=lambda p: (p / "tuner.pkl").stat().st_mtime).name if paths else None
    if not found:
        raise ConfigError(f"there is no {kind} to resume under {storage}")
    return found


def train(cfg: StudyConfig, *, config_path: str | None = None, quiet: bool = False) -> StudyResult:
    """Run one training trial; raises TrainingFailed if it errored."""
    import ray.tune

    cfg = with_absolute_paths(cfg)

    result = run_trials(
        cfg,
        kind="train",
        param_space={"config": cfg.dump(), "search": {}},
        tune_config=lambda: ray.tune.TuneConfig(num_samples=1),
        parent_tags={"config_file": str(config_path or "")},
        quiet=quiet,
    )
    (trial,) = result.trials
    if trial["error"]:
        raise TrainingFailed(f"training failed: {trial['error']} (logs under {result.experiment_path})")
    return result
