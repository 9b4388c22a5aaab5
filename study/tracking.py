"""MLflow on the driver: every run the kit creates is created here.

Training: one parent run per study (:func:`start_parent_run`), one nested child
run per trial (:class:`TrialLogger`). Analyses (ablation, intervention,
dissection): one finished run each (:func:`study.analysis_runs.log_analysis_run`,
built on the helpers here), tagged ``kind``, nested under the checkpoint's trial run.

Only the driver writes to MLflow (sqlite locks under many writers). Trials are
logged by :class:`TrialLogger`, a Tune callback, so a single ``study train`` and
every sweep trial land in MLflow the same way:

* params: the swept values under short keys (``par_rate``), the rest of the model-defining config under
  dotted keys (``train.lr``): one key per setting, no ``None`` values;
* metrics: every ``split/name`` key each epoch, with ``step = epoch``; an epoch
  already logged for a trial is never logged again (a resumed driver replays none),
  and when a trial ends, every epoch its newest checkpoint holds (``history.json``)
  that the run lacks is logged then (a kill can land between a checkpoint and its
  MLflow metrics): the checkpoint is the record;
* artifact: the final checkpoint (``checkpoint/checkpoint.pt``); its folder is the
  tag ``checkpoint_uri``, which with remote storage is the only reference
  (``s3://bucket/prefix/train-<trial>/checkpoint_<time>``, scheme kept);
* tags: ``mlflow.parentRunId``, ``trial_id``, ``status``, ``swept``.

The headline numbers every run carries (``selected/*``) are defined in :mod:`study.headline`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from study.config import StudyConfig
from study.headline import peak_metrics, selected_metrics
from study.mlflow_store import PARENT_TAG, client, experiment_id
from study.mlflow_ui import save_trials_view, short_keys
from study.storage import as_uri, is_remote, newest_checkpoint
from trainables.loop import STOP_ENV, stop_point

CHECKPOINT_PATH_KEY = "checkpoint_path"  # ray.tune.integration.ray_train.CHECKPOINT_PATH_KEY
RUN_COLOR_TAG = "mlflow.runColor"  # the colour the MLflow UI draws a run in (its charts, the table's dot)
TRIAL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                "#17becf")  # matplotlib's tab10: ten colours told apart at a glance, in trial order


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def provenance_tags(kind: str) -> dict[str, str]:
    """What every run carries: its kind, the code's git commit (MLflow's own tag too, shown in the UI) and command."""
    commit = git_commit()
    entry = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv and sys.argv[0] else "study"
    return {"kind": kind, "git_commit": commit, "mlflow.source.git.commit": commit, "command": " ".join(sys.argv),
            "mlflow.source.name": entry, "mlflow.source.type": "LOCAL"}


# The sections that define a trained model; a run's params hold these (dotted keys) and nothing else, so the
# runs table is not 130 columns of sweep, ray, ablation and dissection settings. The whole config is config.yaml.
MODEL_SECTIONS = ("data", "model", "regularization", "train")


def model_params(dump: dict[str, Any]) -> dict[str, Any]:
    return flatten({k: dump[k] for k in MODEL_SECTIONS if k in dump})


def swept_paths(cfg: StudyConfig, kind: str = "sweep") -> list[str]:
    """The config paths a study varies (search space, grid, methods' overrides, seeds); none for ``study train``
    (``kind`` = train), which runs the config as it is whatever its sweep section says."""
    if kind != "sweep":
        return []
    paths = list(cfg.sweep.space) + list(cfg.sweep.grid)
    for overrides in cfg.sweep.methods.values():
        paths += [p for p in overrides if p not in paths]
    if cfg.sweep.seeds and "train.seed" not in paths:
        paths.append("train.seed")
    return paths


def log_config_yaml(c, run_id: str, dump: dict[str, Any], name: str = "config.yaml") -> None:
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(yaml.safe_dump(dump, sort_keys=False))
        c.log_artifact(run_id, str(path))


def start_parent_run(cfg: StudyConfig, kind: str, name: str, tags: dict[str, str] | None = None) -> str:
    """Create the study's parent run (tag ``kind=study``); returns its id."""
    c = client(cfg)
    varied = swept_paths(cfg, kind)
    swept = ", ".join(short_keys(varied).values()) or "nothing (one training run)"
    all_tags = {**provenance_tags("study"), "study.kind": kind, **(tags or {}),
                "mlflow.note.content": f"A {kind} of {cfg.sweep.num_samples if kind == 'sweep' else 1} trial(s) "
                                       f"varying {swept}; chosen on {cfg.sweep.metric}. Its trials are the nested "
                                       "runs (kind=trial); the whole config is config.yaml."}
    run = c.create_run(experiment_id(cfg), run_name=name, tags=all_tags)
    c.set_tag(run.info.run_id, "trials_view", save_trials_view(cfg, run.info.run_id, varied,
                                                                  bool(cfg.sweep.methods) and kind == "sweep"))
    sweep = {f"sweep.{k}": v for k, v in (("num_samples", cfg.sweep.num_samples), ("scheduler", cfg.sweep.scheduler),
                                          ("metric", cfg.sweep.metric))} if kind == "sweep" else {}
    fixed = {k: v for k, v in model_params(cfg.dump()).items() if k not in varied}  # trials vary the rest
    c.log_batch(run.info.run_id, params=mlflow_params({**fixed, **sweep}))
    log_config_yaml(c, run.info.run_id, cfg.dump())
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


def mlflow_params(flat: dict[str, Any]):
    """MLflow params of ``flat``, leaving out ``None`` values (a setting left at "unset" is not a parameter)."""
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in flat.items() if v is not None]


def get_path(dump: dict[str, Any], path: str) -> Any:
    """The value at a dotted config path (``regularization.dropout.rate``) of a config dump."""
    value: Any = dump
    for part in path.split("."):
        value = value[part]
    return value


def swept_values(cfg: StudyConfig, resolved: dict[str, Any], kind: str = "sweep"
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """(short key -> value, short key -> dotted path) of the settings a study varies, as ``resolved`` has them.

    Floats at 4 significant digits, for readable columns (config.yaml holds the exact values).
    """
    names = short_keys(swept_paths(cfg, kind))
    values = {}
    for path, short in names.items():
        value = get_path(resolved, path)
        values[short] = float(f"{value:.4g}") if isinstance(value, float) else value
    return values, {short: path for path, short in names.items()}


def log_dataset(c, run_id: str, data: dict[str, Any], context: str = "training") -> None:
    """The dataset of a ``data`` config section as the run's MLflow input (name, digest of the split settings,
    source, split profile), tagged with ``context`` (training, evaluation)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from trainables.datasets import dataset_spec

    source_type, source = dataset_spec(data["name"]).source(data)
    spec = json.dumps({k: data.get(k) for k in ("name", "root", "num_train", "num_test", "seed", "val_fraction",
                                                "image_size")}, sort_keys=True)
    dataset = Dataset(name=data["name"], digest=hashlib.sha256(spec.encode()).hexdigest()[:8],
                      source_type=source_type, source=json.dumps(source),
                      profile=json.dumps({"val_fraction": data.get("val_fraction"), "split_seed": data.get("seed")}))
    c.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


def is_metric(key: str, value: Any) -> bool:
    return ("/" in key or key == "lr") and isinstance(value, (int, float)) and not isinstance(value, bool)


def _head(result: dict) -> str:
    """`` (first 500)`` when this epoch's test accuracy is on a head of the test split, else nothing."""
    n, whole = result.get("test/images"), result.get("test/split_images")
    return f" (first {int(n)})" if n is not None and whole is not None and n < whole else ""


class TrialLogger(Callback):
    """Tune callback: trial runs in MLflow nested under ``parent_run_id``, plus a progress line per epoch.

    A trial run: tags ``kind=trial``, ``trial_id``, ``status``, ``method``, ``swept``
    (JSON: short key -> config path), the git commit; params: the swept values
    under short keys only (``par_rate``, ``dropout.rate``, ``lambda``) and the rest
    of the model-defining sections (data, model, regularization, train) under
    dotted keys; the whole resolved config as ``config.yaml``; the dataset as an
    MLflow input; per epoch (``step`` = epoch, from 1) every ``split/name`` and
    ``system/*`` metric and ``epochs_completed``; at the end ``selected/*`` and
    ``peak/*`` (:mod:`study.headline`). A trial ASHA stopped is renamed
    ``trial-<id> (stopped, epoch N)``, a failed one ``trial-<id> (failed)``.
    """

    def __init__(self, cfg: StudyConfig, parent_run_id: str, resolve, quiet: bool = False, kind: str = "sweep"):
        self.cfg, self.parent_run_id, self.resolve, self.quiet, self.kind = cfg, parent_run_id, resolve, quiet, kind
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
        return {"cfg": self.cfg, "parent_run_id": self.parent_run_id, "resolve": self.resolve, "quiet": self.quiet,
                "kind": self.kind}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"kind": "sweep", **state})
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
            run_id = self._create_trial_run(trial)
            self.logged[trial.trial_id] = set()
        self.runs[trial.trial_id] = run_id
        return run_id

    def _next_color(self) -> str:
        """The next of :data:`TRIAL_COLORS` for this study's next trial (MLflow's own colours, hashed from run
        ids, gave two of three trials nearly the same green)."""
        trials = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = "
                                         f"'{self.parent_run_id}' and tags.kind = 'trial'", max_results=1000)
        return TRIAL_COLORS[len(trials) % len(TRIAL_COLORS)]

    def _create_trial_run(self, trial) -> str:
        resolved = self.resolve(trial.config)
        self._epochs[trial.trial_id] = resolved["train"]["epochs"]
        method = (trial.config.get("search") or {}).get("method")
        values, paths = swept_values(self.cfg, resolved, self.kind)  # under short keys only: one key per setting
        described = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in values.items())
        where = (f"the checkpoint stays in the storage, at the URI of the tag checkpoint_uri (under "
                 f"{self.cfg.ray.storage_path})." if is_remote(self.cfg.ray.storage_path)
                 else "the checkpoint is under checkpoint/.")
        tags = {PARENT_TAG: self.parent_run_id, **provenance_tags("trial"), "trial_id": trial.trial_id,
                "status": "running", "swept": json.dumps(paths), RUN_COLOR_TAG: self._next_color(),
                "mlflow.note.content": f"Trial {trial.trial_id}" + (f" of method {method}" if method else "")
                                       + (f": {described}" if described else "") + ". The resolved config is "
                                       f"config.yaml; {where}"}
        if method is not None:
            tags["method"] = str(method)
            values["method"] = method
        run_id = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}", tags=tags).info.run_id
        rest = {k: v for k, v in model_params(resolved).items() if k not in paths.values()}
        self.client.log_batch(run_id, params=mlflow_params({**values, **rest}))
        log_config_yaml(self.client, run_id, resolved)
        log_dataset(self.client, run_id, resolved["data"])
        return run_id

    def _trial_epochs(self, trial) -> int:
        if trial.trial_id not in self._epochs:
            self._epochs[trial.trial_id] = self.resolve(trial.config)["train"]["epochs"]
        return self._epochs[trial.trial_id]

    def _summarize(self, trial, run_id: str, history: list[dict[str, Any]]) -> dict[str, float]:
        """``selected/*`` (the kept checkpoint's epoch: ``history``, its record, else the run's last logged epoch)
        and ``peak/*`` (the best val/acc of any epoch) on the trial run (:mod:`study.headline`); returns them."""
        from mlflow.entities import Metric

        logged = {key: {m.step: m.value for m in self.client.get_metric_history(run_id, key)}
                  for key in ("val/acc", "test/acc")}
        if not history and logged["test/acc"]:  # no readable checkpoint: the run's own last epoch
            history = [{"epoch": step - 1, "val/acc": logged["val/acc"].get(step), "test/acc": value}
                       for step, value in logged["test/acc"].items()]
        values = {**selected_metrics(history, self._trial_epochs(trial)), **peak_metrics(logged["val/acc"])}
        now = int(time.time() * 1000)
        if values:
            self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()])
        return values

    # -- Tune hooks (driver side)
    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def _log_epoch(self, trial, run_id: str, result: dict[str, Any], step: int) -> None:
        """One epoch's metrics at ``step`` (and, with the first, the evaluation sizes as params)."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if is_metric(k, v) and not k.endswith("images")]
        metrics.append(Metric("epochs_completed", step, now, step))
        self.client.log_batch(run_id, metrics=metrics)
        if not self.logged[trial.trial_id]:  # constant per trial: params, not charts
            # the images behind the selected accuracies (the last epoch evaluates the whole test split), and
            # how many of them were evaluated after the other epochs when that was a head of it
            split = {k: int(v) for k, v in result.items() if k.endswith("/images") and is_metric(k, v)}
            whole = int(result.get("test/split_images", split.get("test/images", 0)))
            if "test/images" in split and split["test/images"] != whole:
                split["test/images_per_epoch"], split["test/images"] = split["test/images"], whole
            sizes = [Param(k.replace("/", "_"), str(v)) for k, v in split.items()]
            try:
                self.client.log_batch(run_id, params=sizes)
            except Exception:  # logged before a resume: MLflow refuses a param written twice
                pass
        self.logged[trial.trial_id].add(step)

    def _reconcile(self, trial, run_id: str) -> list[dict[str, Any]]:
        """Log every epoch the trial's newest checkpoint holds and the run lacks; that checkpoint is the final one.
        Returns its history (every epoch's metrics up to it; [] when none is readable)."""
        uri, history = newest_checkpoint((trial.config or {}).get("storage_path"), trial.trial_id)
        missing = [h for h in history if int(h["epoch"]) + 1 not in self.logged[trial.trial_id]]
        for metrics in sorted(missing, key=lambda h: h["epoch"]):
            self._log_epoch(trial, run_id, metrics, int(metrics["epoch"]) + 1)
        if missing and not self.quiet:
            steps = ", ".join(str(int(h["epoch"]) + 1) for h in missing)
            print(f"[{trial.trial_id}] epoch(s) {steps} logged from the checkpoint (their results never reached "
                  "MLflow: finished after the scheduler stopped the trial, or lost to a kill)", flush=True)
        if uri:
            self.checkpoints[trial.trial_id] = uri
        return history

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 1) - 1))
        step = epoch + 1  # the console's "epoch 3/10" is step 3
        if CHECKPOINT_PATH_KEY in result:
            self.checkpoints[trial.trial_id] = result[CHECKPOINT_PATH_KEY]
        if step in self.logged[trial.trial_id]:
            return
        stop_point(os.environ.get(STOP_ENV), "logging", step)
        self._log_epoch(trial, run_id, result, step)
        stop_point(os.environ.get(STOP_ENV), "logged", step)
        if not self.quiet:
            epochs = self._trial_epochs(trial)
            pen = f"  penalty {result['train/penalty']:.4f}" if result.get("train/penalty") else ""
            val = f"val/acc {result['val/acc']:.1%}  " if "val/acc" in result else ""
            print(
                f"[{trial.trial_id}] epoch {step}/{epochs}  train/loss {result['train/loss']:.3f}  "
                f"train/acc {result['train/acc']:.1%}  {val}test/acc {result['test/acc']:.1%}{_head(result)}{pen}  "
                f"{result['time/epoch_s']:.1f} s ({result['system/images_per_s']:.0f} img/s)",
                flush=True,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        history = self._reconcile(trial, run_id)
        path = self.checkpoints.get(trial.trial_id)
        if path:
            uri = as_uri(self.cfg.ray.storage_path, path)  # Ray reports s3://b/p/x as b/p/x: the scheme goes back
            self.client.set_tag(run_id, "checkpoint_uri", uri)
            if not is_remote(uri):  # remote storage: the tag is the reference, no copy
                self.client.log_artifacts(run_id, path, artifact_path="checkpoint")
        epochs = self._trial_epochs(trial)
        stopped_early = len(self.logged.get(trial.trial_id, ())) < epochs
        selected = self._summarize(trial, run_id, history)
        self.client.set_tag(run_id, "status", "stopped_early" if stopped_early else "finished")
        if stopped_early:  # marked where every table and chart legend shows it: the run's name
            at = f", epoch {int(selected['selected/epoch'])}" if "selected/epoch" in selected else ""
            self.client.update_run(run_id, name=f"trial-{trial.trial_id} (stopped{at})")
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        history = self._reconcile(trial, run_id)
        self._summarize(trial, run_id, history)
        self.client.set_tag(run_id, "status", "failed")
        self.client.update_run(run_id, name=f"trial-{trial.trial_id} (failed)")
        self.client.set_terminated(run_id, "FAILED")
