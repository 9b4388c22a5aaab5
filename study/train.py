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
import time
from dataclasses import dataclass
from typing import Any

from study.config import StudyConfig, validate
from study.runtime import (
    TRIAL_DRIVER_CPUS,
    check_cluster_fits,
    check_local_prerequisites,
    init_ray,
    storage_path,
    worker_resources,
)
from study.tracking import TrialLogger, start_parent_run
from trainables.errors import UnitstudyError


class TrainingFailed(UnitstudyError):
    """A trial ended in an error after Ray Train's retries were used up."""


def resolve_trial_config(trial_config: dict[str, Any]) -> dict[str, Any]:
    """The trial's validated config dump: base config with the trial's search values set."""
    raw = copy.deepcopy(trial_config["config"])
    for path, value in (trial_config.get("search") or {}).items():
        node = raw
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return validate(raw).dump()


def trial_fn(trial_config: dict[str, Any]) -> None:
    """Tune function trainable: build and fit this trial's TorchTrainer."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainables.loop import train_fn_per_worker

    dump = resolve_trial_config(trial_config)
    cfg = validate(dump)
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": dump, "num_classes": cfg.num_classes},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=worker_resources(cfg),
        ),
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


def run_trials(
    cfg: StudyConfig,
    *,
    kind: str,
    param_space: dict[str, Any],
    tune_config,
    name: str | None = None,
    parent_tags: dict[str, str] | None = None,
    quiet: bool = False,
) -> StudyResult:
    """Run a Tuner over :func:`trial_fn`, with every trial logged under one MLflow parent run."""
    import ray.tune

    check_local_prerequisites(cfg)
    storage = storage_path(cfg)
    init_ray(cfg)
    check_cluster_fits(cfg)
    name = name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = start_parent_run(cfg, kind, name, tags={"storage_path": storage, **(parent_tags or {})})
    logger = TrialLogger(cfg, parent, resolve_trial_config, quiet=quiet)
    trainable = ray.tune.with_resources(trial_fn, {"cpu": TRIAL_DRIVER_CPUS})
    tuner = ray.tune.Tuner(
        trainable,
        param_space={**param_space, "storage_path": storage},
        tune_config=tune_config,
        run_config=ray.tune.RunConfig(name=name, storage_path=storage, callbacks=[logger], verbose=0),
    )
    grid = tuner.fit()
    trials = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")  # Tune fills it in; absent if no epoch finished
        trials.append(
            {
                "trial_id": trial_id,
                "metrics": {k: v for k, v in (result.metrics or {}).items() if "/" in k or k == "epoch"},
                "error": None if result.error is None else str(result.error).strip().splitlines()[-1][:300],
                "checkpoint_path": (result.metrics or {}).get("checkpoint_path"),
                "run_id": logger.runs.get(trial_id),
            }
        )
    from study.tracking import client

    c = client(cfg)
    finished = [t for t in trials if t["error"] is None and "test/acc" in t["metrics"]]
    if finished:
        best = max(finished, key=lambda t: t["metrics"]["test/acc"])
        c.log_metric(parent, "best/test_acc", best["metrics"]["test/acc"])
        c.set_tag(parent, "best_trial_id", str(best["trial_id"]))
    c.set_terminated(parent, "FINISHED" if len(finished) == len(trials) else "FAILED")
    return StudyResult(parent_run_id=parent, experiment_path=f"{storage}/{name}", trials=trials)


def train(cfg: StudyConfig, *, config_path: str | None = None, quiet: bool = False) -> StudyResult:
    """Run one training trial; raises TrainingFailed if it errored."""
    import ray.tune

    result = run_trials(
        cfg,
        kind="train",
        param_space={"config": cfg.dump(), "search": {}},
        tune_config=ray.tune.TuneConfig(num_samples=1, metric="test/acc", mode="max"),
        parent_tags={"config_file": str(config_path or "")},
        quiet=quiet,
    )
    (trial,) = result.trials
    if trial["error"]:
        raise TrainingFailed(f"training failed: {trial['error']} (logs under {result.experiment_path})")
    return result
