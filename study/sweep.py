"""``study sweep``: the hyperparameter study over the trial function of ``study train``.

Two kinds of sweep, both from the ``sweep`` config section:

* a search (``sweep.space``): OptunaSearch (seeded TPE) over dotted config paths
  with uniform / loguniform / int / choice distributions, ``num_samples`` trials;
* a grid (``sweep.methods`` x ``sweep.seeds`` x ``sweep.grid``): Tune's basic
  variant generator (OptunaSearch refuses ``grid_search``), ``num_samples``
  repeats of every grid point - Table 2's methods x seeds.

Objective ``sweep.metric`` (default ``val/acc``, maximised; ``val/loss`` is
minimised), on the validation split carved from train: Optuna, ASHA and the best
trial all read it, and the test split is only reported. ASHA (``sweep.scheduler =
asha``, over epochs) stops weak trials early; ``fifo`` runs every trial to the end.
With ``data.val_fraction = 0`` only a grid under ``fifo`` runs, and no best trial is chosen. Every trial is a child run
of one MLflow parent run, which also gets the best trial's values, the Optuna
parameter importances and the optimization history as PNGs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from study.config import StudyConfig
from study.runtime import (
    TRIAL_DRIVER_CPUS,
    cluster_capacity,
    copies_in,
    describe_resources,
    trial_bundles,
    with_absolute_paths,
    worker_resources,
)
from study.train import StudyResult, run_trials
from trainables.errors import ConfigError


def search_space(cfg: StudyConfig) -> dict[str, Any]:
    """The ``search`` part of the param space: Tune domains, or grid_search axes."""
    from ray import tune

    space: dict[str, Any] = {}
    for path, d in cfg.sweep.space.items():
        if d.type == "uniform":
            space[path] = tune.uniform(d.low, d.high)
        elif d.type == "loguniform":
            space[path] = tune.loguniform(d.low, d.high)
        elif d.type == "int":
            space[path] = tune.randint(int(d.low), int(d.high) + 1)  # randint's upper bound is exclusive
        else:
            space[path] = tune.choice(d.values)
    if cfg.sweep.methods:
        space["method"] = tune.grid_search(list(cfg.sweep.methods))
    if cfg.sweep.seeds:
        space["train.seed"] = tune.grid_search(list(cfg.sweep.seeds))
    for path, values in cfg.sweep.grid.items():
        space[path] = tune.grid_search(list(values))
    return space


def concurrent_trials(cfg: StudyConfig) -> int:
    """``sweep.max_concurrent_trials``, else as many trials as the cluster holds at once (printed).

    On an autoscaling cluster whose config can be read, as many as the largest
    cluster it may grow to holds, packed node by node (the pending trials are the
    demand that makes it grow); elsewhere, as many as the nodes up now hold (on an
    autoscaling cluster: after it grew to hold one trial). A GPU share below 1
    (``train.gpus_per_worker``) packs floor(1 / share) workers on each GPU. More
    would let trial drivers take the CPUs their own Train workers then wait for forever.
    """
    import ray

    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    capacity = cluster_capacity()
    if capacity is not None:
        fits = max(1, capacity.copies(trial_bundles(cfg)))
        print(f"up to {fits} trials at once: what this autoscaling cluster holds at its max_workers "
              f"({capacity.max_workers})", flush=True)
        return fits
    total = ray.cluster_resources()
    fits = max(1, copies_in(total, trial_bundles(cfg)))
    per_worker = worker_resources(cfg)
    print(f"up to {fits} trials at once: what this cluster holds ({describe_resources(total)}; a trial takes "
          f"{cfg.train.num_workers} x ({describe_resources(per_worker)}) + {TRIAL_DRIVER_CPUS:g} CPU)", flush=True)
    return fits


def asha_milestones(cfg: StudyConfig) -> list[int]:
    """The epochs (from 1) after which ASHA may stop a trial: its rungs, placed as Ray's ``ASHAScheduler`` places
    them (``grace_period * reduction_factor ** k``, as many as fit below ``train.epochs``); none under fifo.

    The workers test on the whole test split at these epochs (``train.test_images_per_epoch`` tests a head of it
    elsewhere), so a stopped trial's last checkpoint, the one it is judged and analysed at, has a whole-split
    test accuracy too.
    """
    import math

    import numpy as np

    if cfg.sweep.scheduler != "asha":
        return []
    max_t, rf = cfg.train.epochs, cfg.sweep.reduction_factor
    grace = min(cfg.sweep.grace_period, max_t)
    rungs = int(np.log(max_t / grace) / np.log(rf) + 1)  # ray.tune.schedulers.async_hyperband._Bracket, s = 0
    # a rung at iteration m judges a trial at its first result with training_iteration >= m (epoch = iteration)
    return sorted({math.ceil(grace * rf**k) for k in range(rungs)})


def tune_config(cfg: StudyConfig):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if cfg.sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.train.epochs,
            grace_period=min(cfg.sweep.grace_period, cfg.train.epochs),
            reduction_factor=cfg.sweep.reduction_factor,
        )
    search_alg = None
    if cfg.sweep.space:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
        search_alg = OptunaSearch(seed=cfg.sweep.seed)  # metric and mode come from TuneConfig
    has_val = cfg.data.val_fraction > 0
    return tune.TuneConfig(
        metric=cfg.sweep.metric if has_val else None,
        mode=cfg.sweep.mode if has_val else None,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=cfg.sweep.num_samples,
        max_concurrent_trials=concurrent_trials(cfg),
    )


def check_validation_split(cfg: StudyConfig) -> None:
    """Refuse a search or ASHA when there is no validation split to choose on."""
    if cfg.data.val_fraction == 0 and (cfg.sweep.space or cfg.sweep.scheduler == "asha"):
        what = "an Optuna search (sweep.space)" if cfg.sweep.space else "ASHA early stopping (sweep.scheduler=asha)"
        raise ConfigError(
            f"{what} chooses on the validation split, but data.val_fraction = 0 holds none out; set "
            "data.val_fraction (e.g. 0.1), or run a grid with sweep.scheduler=fifo"
        )


def sweep(
    cfg: StudyConfig, *, config_path: str | None = None, resume: bool = False, name: str | None = None,
    quiet: bool = False,
) -> StudyResult:
    """Run (or resume) the sweep; log the summary figures to the parent run."""
    check_validation_split(cfg)
    cfg = with_absolute_paths(cfg)
    result = run_trials(
        cfg,
        kind="sweep",
        param_space={"config": cfg.dump(), "search": search_space(cfg), "full_test_epochs": asha_milestones(cfg)},
        tune_config=lambda: tune_config(cfg),
        name=name or cfg.sweep.name,
        parent_tags={"config_file": str(config_path or ""), "sweep.seed": str(cfg.sweep.seed)},
        quiet=quiet,
        resume=resume,
    )
    log_summary(cfg, result)
    return result


def _sweep_space(cfg: StudyConfig, result: StudyResult) -> dict:
    """The search space the trials were drawn from: the sweep's own stored config.

    After ``--resume`` Tune continues with the param space it stored, whatever the
    config file says now, so the summary must use that space too.
    """
    for t in result.trials:
        if t["config"] is not None:
            return StudyConfig.model_validate(t["config"]).sweep.space
    return cfg.sweep.space


def _epochs_of(cfg: StudyConfig, trial: dict) -> int:
    """The epochs a trial was configured to run (its own stored config, else ``cfg``'s)."""
    return StudyConfig.model_validate(trial["config"]).train.epochs if trial["config"] is not None else cfg.train.epochs


def full_fidelity(cfg: StudyConfig, trial: dict) -> bool:
    """Whether the trial reported its last epoch (ASHA did not stop it): its metric is comparable to the others'."""
    return trial["metrics"].get("epoch") == _epochs_of(cfg, trial) - 1


def optuna_study(cfg: StudyConfig, result: StudyResult, *, full_only: bool = False):
    """An Optuna study rebuilt from the finished trials (works the same after a resume); ``full_only``: only
    the trials run to their last epoch (ASHA reports stopped ones to Optuna as complete at a lower fidelity)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {}
    for path, d in _sweep_space(cfg, result).items():
        if d.type in ("uniform", "loguniform"):
            dists[path] = FloatDistribution(d.low, d.high, log=d.type == "loguniform")
        elif d.type == "int":
            dists[path] = IntDistribution(int(d.low), int(d.high))
        else:
            dists[path] = CategoricalDistribution(d.values)
    metric = cfg.sweep.metric
    study = optuna.create_study(direction="maximize" if cfg.sweep.mode == "max" else "minimize")
    for t in result.trials:
        if full_only and not full_fidelity(cfg, t):
            continue
        if t["error"] is None and metric in t["metrics"] and set(dists) <= set(t["search"]):
            params = {p: t["search"][p] for p in dists}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t["metrics"][metric]))
    return study


def log_summary(cfg: StudyConfig, result: StudyResult) -> None:
    """Optimization history and parameter importances (PNG) on the parent run, for a search."""
    if not _sweep_space(cfg, result):
        return
    import optuna

    from analysis.figures import importances_figure, optimization_history_figure
    from study.mlflow_store import client

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna_study(cfg, result)
    c = client(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        if study.trials:
            optimization_history_figure(study, cfg.sweep.metric, Path(tmp))
        full = optuna_study(cfg, result, full_only=True)  # importances only between trials of one fidelity
        epochs = cfg.train.epochs
        if len(full.trials) < 2:
            c.set_tag(result.parent_run_id, "param_importances",
                      f"not computed: {len(full.trials)} of {len(study.trials)} trials ran all {epochs} epochs "
                      "(ASHA stopped the others), and importances need at least 2 trials of the same fidelity")
        else:
            try:
                importances = optuna.importance.get_param_importances(full)
            except (RuntimeError, ValueError) as exc:  # e.g. every trial drew the same value
                c.set_tag(result.parent_run_id, "param_importances", f"not computable: {exc}")
            else:
                for path, value in importances.items():
                    c.log_metric(result.parent_run_id, f"importance/{path}", value)
                c.set_tag(result.parent_run_id, "param_importances",
                          f"from the {len(full.trials)} trials that ran all {epochs} epochs"
                          + ("; fewer than 5: not reliable" if len(full.trials) < 5 else ""))
                importances_figure(importances, cfg.sweep.metric, Path(tmp), trials=len(full.trials),
                                   fidelity=f"all {epochs} epochs")
        c.log_artifacts(result.parent_run_id, tmp, artifact_path="figures")
