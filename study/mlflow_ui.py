"""The tracking server from the user's side: is it there, and links into its UI.

:func:`check_tracking` refuses an ``http(s)://`` tracking URI that does not answer,
before any Ray work; :func:`short_keys` names swept parameters for columns. The links: a run's page, an experiment's runs table, and a
saved view of one study's trials.

MLflow 3 opens an experiment on its GenAI traces overview; every link here carries
``?workflowType=machine_learning`` so it lands on the model-training pages. A
study's trials get a shared view (an experiment tag ``mlflow.sharedViewState.<key>``,
what the UI's Share button stores), opened with ``&viewStateShareKey=<key>``.
"""

from __future__ import annotations

import json

from study.config import StudyConfig
from study.mlflow_store import PARENT_TAG, client, experiment_id

__all__ = ["check_tracking", "run_url", "runs_url", "save_trials_view", "short_keys", "trials_view_key", "ui_hint"]


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


def trials_view_key(parent_run_id: str) -> str:
    return f"unitstudy-{parent_run_id[:12]}"


def save_trials_view(cfg: StudyConfig, parent_run_id: str, swept: list[str], methods: bool = False) -> str:
    """A shared view of one study's trials in the runs table: its trials only (flat, best val/acc first),
    with the swept values, val/test accuracy, epochs completed and status as columns. Returns its key."""
    def col(kind: str, key: str) -> str:
        return f"{kind}.`{key}`"

    columns = ([col("params", "method")] * methods + [col("params", k) for k in short_keys(swept).values()]
               + [col("metrics", k) for k in ("val/acc", "test/acc", "best/val_acc", "best/test_acc",
                                               "epochs_completed")]
               + [col("tags", "status"), col("attributes", "Duration")])
    state = {"searchFilter": f"tags.kind = 'trial' and tags.`{PARENT_TAG}` = '{parent_run_id}'",
             "orderByKey": col("metrics", "val/acc"), "orderByAsc": False, "selectedColumns": columns}
    key = trials_view_key(parent_run_id)
    client(cfg).set_experiment_tag(experiment_id(cfg), SHARED_VIEW_TAG + key, json.dumps(state))
    return key


def ui_hint(cfg: StudyConfig, run_id: str | None = None, *, trials_of: str | None = None) -> str:
    """The UI link of ``run_id``, of the trials of study ``trials_of`` (its saved view), or of the
    experiment's runs table; with how to start a local UI."""
    url = (run_url(cfg, run_id) if run_id else runs_url(cfg, trials_view_key(trials_of)) if trials_of
           else runs_url(cfg))
    uri = cfg.tracking.mlflow_uri
    if uri.startswith(("http://", "https://")):
        return url
    return f"{url}  (start the UI first: mlflow ui --backend-store-uri {uri})"
