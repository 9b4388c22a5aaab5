"""The MLflow run of an analysis (``study ablate``, ``study intervene``, ``study dissect``).

One finished run per command, nested under the trial run that trained the
checkpoint. Its parameters lead with the analysis's own settings, only those
that apply to it (:func:`analysis_settings`: ``ablation.*``, ``intervention.*``
or ``dissection.*``), then the analysed trial's swept values under a ``trial.``
prefix (:func:`trial_values`); no parameter is ``None``. Its metrics carry the
checkpoint's ``selected/*`` (:mod:`study.headline`: the epoch it read and that
epoch's accuracies), its dataset is the run's MLflow input (context
``evaluation``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.config import StudyConfig
from study.headline import SELECTED, checkpoint_selected
from study.mlflow_store import PARENT_TAG, client, experiment_id
from study.tracking import log_config_yaml, log_dataset, mlflow_params, provenance_tags
from trainables.loop import STOP_ENV, stop_point

if TYPE_CHECKING:
    from study.sources import Source

__all__ = ["analysis_settings", "log_analysis_run", "trial_values"]

# The config fields that define each analysis's result (``ablation`` section for ablation and intervention),
# under the name the run logs them by. Execution settings (unit_chunk, num_gpus, max_retries) are left out.
_SETTINGS: dict[str, tuple[str, dict[str, str]]] = {
    "ablation": ("ablation", {"layer": "layer", "units": "units", "dtype": "dtype",
                              "precision_sample": "precision_sample"}),
    "intervention": ("ablation", {"layer": "layer", "units": "units", "dtype": "dtype", "top_k": "top_k",
                                  "factors": "factors"}),
    "dissection": ("dissection", {"layer": "layer", "concepts": "concepts", "broden_root": "broden_root",
                                  "quantile": "top_quantile", "iou_threshold": "iou_threshold",
                                  "num_images": "num_images", "top_images": "top_images", "image_size": "image_size",
                                  "denominator": "denominator", "threshold_on": "threshold_on",
                                  "categories": "categories", "seed": "seed", "split": "split",
                                  "threshold_method": "threshold_method"}),
}
_BRODEN_ONLY = ("broden_root", "seed", "split", "categories")


def analysis_settings(cfg: StudyConfig, kind: str) -> dict[str, Any]:
    """``<kind>.<name>`` -> value for the settings that define this analysis, ``None`` ones left out.

    The dissection's top quantile (config ``dissection.quantile``) is ``dissection.top_quantile``, so it is
    never read as the q-value of a test; Broden's own settings appear only for Broden concepts; the ablation's
    float64 check size only for float32 counts.
    """
    section, names = _SETTINGS[kind]
    values = cfg.dump()[section]
    out = {}
    for field, name in names.items():
        value = values.get(field)
        if value is None:
            continue
        if kind == "dissection" and field in _BRODEN_ONLY and values.get("concepts") != "broden":
            continue
        if field == "precision_sample" and values.get("dtype") != "float32":
            continue
        out[f"{kind}.{name}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def _source_run(cfg: StudyConfig, source: Source):
    if not source.run_id:
        return None
    try:
        return client(cfg).get_run(source.run_id)
    except Exception:  # a run of another store: the checkpoint alone describes it
        return None


def trial_values(run) -> dict[str, str]:
    """``trial.<key>`` -> value of the swept settings (and method) of the trial run ``run``; {} when none."""
    if run is None:
        return {}
    try:
        swept = json.loads(run.data.tags.get("swept") or "{}")
    except ValueError:
        swept = {}
    out = {f"trial.{key}": run.data.params[key] for key in swept if key in run.data.params}
    if run.data.tags.get("method"):
        out["trial.method"] = run.data.tags["method"]
    return out


def _selected(source: Source, run) -> dict[str, float]:
    """``selected/*`` of the checkpoint read: from its own history, else (a bare state dict) its trial run's."""
    values = checkpoint_selected(source.checkpoint)
    if not values and run is not None:
        values = {k: v for k, v in run.data.metrics.items() if k in SELECTED}
    return values


def log_analysis_run(
    cfg: StudyConfig,
    source: Source,
    *,
    kind: str,
    metrics: dict[str, float],
    params: dict[str, Any],
    files: Sequence[Path],
    tags: dict[str, str] | None = None,
    summary: str = "",
    started: float | None = None,
) -> str:
    """One finished MLflow run (``kind`` = ablation | intervention | dissection) with ``files`` as artifacts.

    Nested under the trial run that trained the checkpoint (tag ``source_run_id``;
    ``study_run_id`` is that trial's study), named after it (``ablation of
    trial-1a2b3c4d``); params: :func:`analysis_settings` overridden by ``params`` (what the command
    resolved: ``<kind>.*``), then :func:`trial_values`; metrics: ``metrics`` (prefixed ``<kind>/``) and the
    checkpoint's ``selected/*``; its description links to the source run and names the checkpoint's epoch.
    ``started`` (``time.time()`` when the command began) makes the run's duration the analysis's. A RUNNING
    run of the same analysis (tag ``analysis_key``: kind, checkpoint, data, model and analysis settings), left
    by a killed command, is deleted first, so a rerun leaves one run with every metric and artifact once.
    """
    from mlflow.entities import Metric, RunTag

    c = client(cfg)
    exp = experiment_id(cfg)
    run = _source_run(cfg, source)
    trial_id = run.data.tags.get("trial_id") if run is not None else None
    of = f"trial-{trial_id}" if trial_id else source.name
    tags = {**provenance_tags(kind), "checkpoint": source.ref, "checkpoint_sha256": source.fingerprint,
            **(tags or {})}
    link = f"checkpoint `{source.ref}`"
    if source.run_id:
        tags["source_run_id"] = source.run_id
        tags[PARENT_TAG] = source.run_id
        link = f"the checkpoint of [{of}](#/experiments/{exp}/runs/{source.run_id})"
    selected = _selected(source, run)
    if "selected/epoch" in selected:
        link += f" (epoch {int(selected['selected/epoch'])}: selected/epoch)"
        tags["checkpoint_epoch"] = str(int(selected["selected/epoch"]))
    if source.parent_run_id:
        tags["study_run_id"] = source.parent_run_id
    # A kill between creating the run and finishing it leaves a RUNNING run; its rerun replaces it. The key is
    # what defines the analysis (not where it ran: ray.address, the output folder).
    section = _SETTINGS[kind][0]
    defining = {k: v for k, v in cfg.dump().items() if k in ("data", "model", section)}
    key = hashlib.sha256(json.dumps([kind, source.fingerprint, defining], sort_keys=True, default=str).encode())
    tags["analysis_key"] = key.hexdigest()[:16]
    for stale in c.search_runs([exp], filter_string=f"tags.analysis_key = '{tags['analysis_key']}' "
                                                    "and attributes.status = 'RUNNING'"):
        c.delete_run(stale.info.run_id)
    run_id = c.create_run(exp, run_name=f"{kind} of {of}", tags=tags,
                          start_time=int(1000 * started) if started else None).info.run_id
    c.log_batch(
        run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in {**metrics, **selected}.items()],
        params=mlflow_params({**analysis_settings(cfg, kind), **params, **trial_values(run)}),
        tags=[RunTag("mlflow.note.content", f"{kind.capitalize()} of {link}. {summary}".strip())],
    )
    log_dataset(c, run_id, cfg.dump()["data"], context="evaluation")
    stop_point(os.environ.get(STOP_ENV), "analysis", 0)
    log_config_yaml(c, run_id, cfg.dump(), name=f"{kind}_config.yaml")
    for f in files:
        c.log_artifact(run_id, str(f))
    c.set_terminated(run_id, "FINISHED")
    return run_id
