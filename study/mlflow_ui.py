"""The tracking server from the user's side: is it there, and links into its UI.

:func:`check_tracking` refuses an ``http(s)://`` tracking URI that does not answer,
before any Ray work; :func:`short_keys` names swept parameters for columns. The
links: a run's page, an experiment's runs table, and a saved view of one study's
trials.

MLflow 3 opens an experiment on the page its per-browser "GenAI / Model training"
switch (top left) last chose, or the GenAI overview; no server setting or
experiment tag changes that. Every link here carries ``?workflowType=machine_learning``,
which opens the model-training pages whatever the switch says. A study's trials
get a shared view (an experiment tag ``mlflow.sharedViewState.<key>``, what the
UI's Share button stores), opened with ``&viewStateShareKey=<key>``
(:func:`save_trials_view`).
"""

from __future__ import annotations

import json

from study.config import StudyConfig
from study.mlflow_store import PARENT_TAG, client, experiment_id

__all__ = ["check_tracking", "run_url", "runs_hint", "runs_url", "save_trials_view", "short_keys", "trials_view",
           "trials_view_key", "ui_hint"]


def short_keys(paths: list[str]) -> dict[str, str]:
    """Readable column names for swept paths: the last part (``par_rate``, ``lambda``), two parts where the
    last is ambiguous (``dropout.rate``), the whole path where even that collides."""
    out: dict[str, str] = {}
    for path in paths:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            key = ".".join(parts[-n:])
            clash = any(other != path and other.split(".")[-n:] == parts[-n:] for other in paths)
            if not clash and (n > 1 or parts[-1] not in ("rate", "seed", "h", "type", "name", "root")):
                break
        out[path] = key
    return out


def check_tracking(cfg: StudyConfig, timeout_s: float = 5.0) -> None:
    """A tracking server (``http(s)://``) that does not answer its ``/health`` is one error, at once.

    MLflow's client would otherwise retry each call for minutes, after Ray has started.
    Local stores (``sqlite:///``, a folder) need no check.
    """
    import urllib.error
    import urllib.request

    from trainables.errors import ConfigError

    uri = cfg.tracking.mlflow_uri
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            why = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        why = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = str(getattr(exc, "reason", exc))
    raise ConfigError(f"cannot reach the MLflow tracking server at tracking.mlflow_uri = {uri} ({why}); start it "
                      "(mlflow server --host ... --port ...) or point tracking.mlflow_uri at a running one")


def ui_base(cfg: StudyConfig) -> str:
    """The UI's address: the tracking server itself, or what ``mlflow ui`` serves by default."""
    uri = cfg.tracking.mlflow_uri
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(cfg: StudyConfig, run_id: str, experiment: str | None = None) -> str:
    """The direct link to a run's page in the MLflow UI."""
    return f"{ui_base(cfg)}/#/experiments/{experiment or experiment_id(cfg)}/runs/{run_id}?workflowType=machine_learning"


def runs_url(cfg: StudyConfig, view: str | None = None) -> str:
    """The experiment's runs table (the machine-learning view, not MLflow 3's GenAI traces overview),
    opened in the saved ``view`` (:func:`save_trials_view`) when given."""
    url = f"{ui_base(cfg)}/#/experiments/{experiment_id(cfg)}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "")


SHARED_VIEW_TAG = "mlflow.sharedViewState."  # what the UI's "Share" button stores; ?viewStateShareKey= opens it

# The trials view's headline columns (study.headline), after the swept values; the status tag says "stopped_early".
HEADLINE_COLUMNS = ("metrics", "selected/val_acc_pct"), ("metrics", "selected/test_acc_pct"), \
    ("metrics", "selected/epoch"), ("tags", "status")
COST_COLUMNS = ("metrics", "system/images_per_s"), ("metrics", "system/peak_gpu_memory_mb"), \
    ("metrics", "system/peak_rss_mb")


def trials_view_key(parent_run_id: str) -> str:
    return f"unitstudy-{parent_run_id[:12]}"


def column_id(kind: str, key: str) -> str:
    """The runs table's id of a column (``params.`par_rate```): what its view state names columns by."""
    return f"{kind}.`{key}`"


def column_width(key: str, sorted_by: bool = False, values: int = 0) -> int:
    """Pixels that show a column's header whole (MLflow 3.17's header font: about 5.6 px a character, 22 px of
    padding, 16 px for the sort arrow) and ``values`` characters of its cells (about 6.2 px each, 28 px of
    padding); at least 64. Measured on screenshots of headless Chromium."""
    return max(64, round(5.6 * len(key) + 22 + 16 * sorted_by), round(6.2 * values + 28))


def trials_view(parent_run_id: str, swept: list[str], methods: bool = False) -> dict:
    """The view state (MLflow 3.17's runs page) of one study's trials, as the UI's Share button stores it.

    * rows: the study's trials only, flat, highest ``selected/val_acc_pct`` first, the first 20 drawn in charts;
    * columns, in this order and at widths that show their headers: the method (a grid), the swept values,
      ``selected/val_acc_pct``, ``selected/test_acc_pct``, ``selected/epoch``, status, then what a trial cost
      (images/s, peak GPU and host memory) and its duration. The run name marks a stopped trial
      (``trial-<id> (stopped, epoch 10)``); Run Name and Created stay pinned on the left (the UI's own);
    * charts (the Chart tab): a first section "Compare trials" with val/acc per epoch and the parallel
      coordinates of the swept values against ``selected/val_acc_pct``; MLflow adds its sections for the
      other metrics after it.
    """
    params = ["method"] * methods + list(short_keys(swept).values())
    order = ([("params", k) for k in params] + list(HEADLINE_COLUMNS) + list(COST_COLUMNS))
    sort_key = "selected/val_acc_pct"
    section = f"unitstudy-compare-{parent_run_id[:12]}"
    charts = [
        {"uuid": f"{section}-val", "type": "LINE", "metricSectionId": section, "deleted": False,
         "isGenerated": False, "runsCountToCompare": 20, "metricKey": "val/acc", "selectedMetricKeys": ["val/acc"],
         "xAxisKey": "step", "xAxisScaleType": "linear", "scaleType": "linear", "lineSmoothness": 0,
         "useGlobalXaxisKey": False, "useGlobalLineSmoothing": False, "displayName": "val/acc per epoch"},
        {"uuid": f"{section}-parallel", "type": "PARALLEL", "metricSectionId": section, "deleted": False,
         "isGenerated": False, "runsCountToCompare": 20, "selectedParams": params,
         "selectedMetrics": [sort_key], "showAllRuns": True},
    ]
    return {
        "searchFilter": f"tags.kind = 'trial' and tags.`{PARENT_TAG}` = '{parent_run_id}'",
        "orderByKey": column_id("metrics", sort_key), "orderByAsc": False,
        "selectedColumns": [column_id(*c) for c in order] + [column_id("attributes", "Duration")],
        "columnOrder": [column_id(*c) for c in order] + ["duration"],  # the Duration column's id is its own
        # cells: a swept value at 4 significant digits ("0.06355"), a status ("stopped_early")
        "columnWidths": {column_id(kind, key): column_width(key, key == sort_key, {"params": 7}.get(kind, 0)
                                                            + 13 * (key == "status"))
                         for kind, key in order},
        "runsHiddenMode": "FIRST_20_RUNS",
        "isAccordionReordered": True,  # keep "Compare trials" first; MLflow appends its own sections after it
        "compareRunSections": [{"uuid": section, "name": "Compare trials", "display": True, "isReordered": True,
                                "deleted": False, "isGenerated": False}],
        "compareRunCharts": charts,
    }


def save_trials_view(cfg: StudyConfig, parent_run_id: str, swept: list[str], methods: bool = False) -> str:
    """Store :func:`trials_view` of one study as a shared view of its experiment; returns its key."""
    key = trials_view_key(parent_run_id)
    state = trials_view(parent_run_id, swept, methods)
    client(cfg).set_experiment_tag(experiment_id(cfg), SHARED_VIEW_TAG + key, json.dumps(state))
    return key


def _local_ui(cfg: StudyConfig) -> str:
    uri = cfg.tracking.mlflow_uri
    if uri.startswith(("http://", "https://")):
        return ""
    return f"  (start the UI first: mlflow ui --backend-store-uri {uri})"


def ui_hint(cfg: StudyConfig, run_id: str | None = None, *, trials_of: str | None = None) -> str:
    """The UI link of ``run_id``, of the trials of study ``trials_of`` (its saved view), or of the
    experiment's runs table; with how to start a local UI."""
    url = (run_url(cfg, run_id) if run_id else runs_url(cfg, trials_view_key(trials_of)) if trials_of
           else runs_url(cfg))
    return url + _local_ui(cfg)


def runs_hint(cfg: StudyConfig) -> str:
    """The experiment's plain runs table, and the one-click switch for when it is opened without this link."""
    return (f"{runs_url(cfg)}  (opened without ?workflowType=machine_learning, MLflow may show its GenAI page: "
            "click \"Model training\" at the top left)")
