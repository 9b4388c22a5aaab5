"""``study report``: the paper's tables rebuilt from the runs in MLflow.

Reads the experiment's runs with ``mlflow.search_runs`` (pandas), keeps the trial
runs that ran to their last epoch (a trial's swept values, logged under short keys
such as ``par_rate``, are read back under their config paths: :func:`config_columns`),
and prints Table 2 (train, val and test
accuracy per method, mean +- 95% t half-width over seeds, with n; the test
accuracy difference from the baseline paired by ``train.seed``, mean +- 95% t
half-width over the pairs, with their number; see :mod:`analysis.tables`) and
the latest Table 1 that ``study intervene`` logged to the experiment. Writes
Table 2 as Markdown and CSV with two figures (test accuracy per method with
interval bars where n >= 2; a parallel-coordinates plot of par_rate, dropout and
lambda against test accuracy) and logs them to the experiment's most recent
study (parent) run under ``report/``. ``table2.md`` carries the caption
(:data:`analysis.tables.TABLE2_CAPTION`: n, every symbol and column) and the note
of the trial runs left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import json

import pandas as pd

from analysis.tables import TABLE2_CAPTION, accuracy_figure, parallel_coordinates_figure, table2, table2_markdown
from study.config import StudyConfig
from study.jobs import anchor
from trainables.errors import ConfigError


@dataclass
class Report:
    table2: pd.DataFrame
    markdown: str
    table1: str | None  # Markdown of the latest `study intervene` run's Table 1, if any
    excluded: dict[str, int]  # reason -> count of trial runs left out
    out_dir: Path
    logged_to: str | None  # parent run id the report was logged to
    notes: list[str]  # below Table 2: which trial runs were left out and why


WHY_LEFT_OUT = {
    "stopped_early": "stopped early by ASHA (their accuracy is of an earlier epoch than the others')",
    "failed": "failed",
    "running": "still running (or killed before they ended)",
}


def left_out_note(excluded: dict[str, int]) -> list[str]:
    """``Left out: 2 trial run(s) stopped early by ASHA (...)``, or nothing when every trial run is in Table 2."""
    if not excluded:
        return []
    parts = [f"{n} trial run(s) {WHY_LEFT_OUT.get(why, why.replace('_', ' '))}" for why, n in excluded.items()]
    return ["Left out: " + "; ".join(parts) + "."]


def config_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with each trial's swept values also under their config paths (``params.regularization.dropout.rate``
    from ``params.dropout.rate``), read off each run's ``swept`` tag (short key -> path), where that column is empty."""
    if "tags.swept" not in runs:
        return runs
    runs = runs.copy()
    for index, text in runs["tags.swept"].dropna().items():
        for short, path in json.loads(text).items():
            column = f"params.{path}"
            if column not in runs:
                runs[column] = pd.Series(pd.NA, index=runs.index, dtype=object)
            if pd.isna(runs.at[index, column]):
                runs.at[index, column] = runs.at[index, f"params.{short}"]
    return runs


def trial_runs(cfg: StudyConfig, experiment: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(all runs, trial runs) of ``experiment`` as search_runs frames."""
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ConfigError(f"there is no MLflow experiment '{experiment}' at {cfg.tracking.mlflow_uri}")
    runs = mlflow.search_runs(experiment_names=[experiment], max_results=50_000)
    if "tags.trial_id" not in runs:
        return runs, runs.iloc[0:0]
    return runs, config_columns(runs[runs["tags.trial_id"].notna()])


def report(cfg: StudyConfig, experiment: str | None = None, out_dir: str | Path | None = None) -> Report:
    from study.mlflow_ui import check_tracking

    check_tracking(cfg)
    experiment = experiment or cfg.tracking.experiment
    runs, trials = trial_runs(cfg, experiment)
    done = trials[(trials["status"] == "FINISHED") & (trials.get("tags.status") == "finished")] if len(trials) else trials
    excluded = {}
    if len(trials):
        status = trials.get("tags.status", pd.Series(index=trials.index, dtype=object)).fillna("unknown")
        for reason, count in status[~trials.index.isin(done.index)].value_counts().items():
            excluded[str(reason)] = int(count)
    if done.empty:
        raise ConfigError(
            f"experiment '{experiment}' has no trial run that finished all its epochs; run `study train` or "
            "`study sweep` first"
        )
    table = table2(done)
    markdown = table2_markdown(table)
    notes = left_out_note(excluded)
    out = Path(anchor(out_dir or f"outputs/report-{experiment}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table2.md").write_text("\n\n".join(["# Table 2: accuracy per regularization method", TABLE2_CAPTION,
                                                 markdown, *notes]) + "\n")
    table.to_csv(out / "table2.csv", index=False)
    accuracy_figure(table, out / "test_accuracy_per_method.png")
    stopped = trials[(trials.get("tags.status") == "stopped_early")] if len(trials) else trials
    parallel_coordinates_figure(done, out / "regularizers_parallel_coordinates.png", stopped)

    from study.mlflow_store import client

    c = client(cfg)
    table1 = None
    if "tags.kind" in runs:
        interventions = runs[(runs["tags.kind"] == "intervention") & (runs["status"] == "FINISHED")]
        if len(interventions):
            latest = interventions.sort_values("start_time").iloc[-1]["run_id"]
            table1 = Path(c.download_artifacts(latest, "table1.md", str(out))).read_text().strip()
    logged_to = None
    parents = runs[runs["run_id"].isin(done["tags.mlflow.parentRunId"].dropna())]
    if len(parents):
        logged_to = parents.sort_values("start_time").iloc[-1]["run_id"]
        c.log_artifacts(logged_to, str(out), artifact_path="report")
    return Report(table2=table, markdown=markdown, table1=table1, excluded=excluded, out_dir=out, logged_to=logged_to,
                  notes=notes)
