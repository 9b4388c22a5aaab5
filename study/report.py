"""``study report``: the paper's tables rebuilt from the runs in MLflow.

Reads the experiment's runs with ``mlflow.search_runs`` (pandas), keeps the trial
runs that ran to their last epoch, and prints Table 2 (train, val and test
accuracy per method, mean +- 95% t half-width over seeds, with n; the test
accuracy difference from the baseline paired by ``train.seed``, mean +- 95% t
half-width over the pairs, with their number; see :mod:`analysis.tables`) and
the latest Table 1 that ``study intervene`` logged to the experiment. Writes
Table 2 as Markdown and CSV with two figures (test accuracy per method with
interval bars where n >= 2; a parallel-coordinates plot of par_rate, dropout and
lambda against test accuracy) and logs them to the experiment's most recent
study (parent) run under ``report/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.tables import accuracy_figure, parallel_coordinates_figure, table2, table2_markdown
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


def trial_runs(cfg: StudyConfig, experiment: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(all runs, trial runs) of ``experiment`` as search_runs frames."""
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ConfigError(f"there is no MLflow experiment '{experiment}' at {cfg.tracking.mlflow_uri}")
    runs = mlflow.search_runs(experiment_names=[experiment], max_results=50_000)
    if "tags.trial_id" not in runs:
        return runs, runs.iloc[0:0]
    return runs, runs[runs["tags.trial_id"].notna()]


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
    out = Path(anchor(out_dir or f"outputs/report-{experiment}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table2.md").write_text(markdown + "\n")
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
    return Report(table2=table, markdown=markdown, table1=table1, excluded=excluded, out_dir=out, logged_to=logged_to)
