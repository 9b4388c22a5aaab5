"""The MLflow store the kit writes to: a client that opens it safely, the experiment, where artifacts go.

A new sqlite store gets its schema from the first process that opens it; two
``study`` commands started at once would both create it and one fails, so the
first opening in each process holds a lock on the store's directory. An
experiment missing when two commands start is created by whichever gets there
first; the other reads it.
"""

from __future__ import annotations

from pathlib import Path

from study.config import StudyConfig

__all__ = ["EXPERIMENT_KIND", "PARENT_TAG", "artifact_root", "client", "experiment_id"]

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag nesting a run under its parent (a trial under its study)

_OPENED: set[str] = set()  # sqlite stores this process has opened (created or checked their schema)


def client(cfg: StudyConfig):
    """An MLflow client for ``tracking.mlflow_uri``; the fluent API is pointed there too.

    MLflow creates (or upgrades) a sqlite store's schema the first time a process
    opens it; two ``study`` commands started at once on a new store would both
    create it and one fails ("no such column"). The first opening in each process
    is therefore serialised by a lock on the store's directory.
    """
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    # A server whose artifacts are in a bucket hands clients presigned URLs of the bucket to download from;
    # the machine running `study` (a laptop through `ray attach -p 5000`) may reach the server and not the
    # store. Artifacts are streamed through the server unless the user asks otherwise.
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    uri = cfg.tracking.mlflow_uri
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///") or uri in _OPENED:
        return MlflowClient(tracking_uri=uri)
    import fcntl

    folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        c = MlflowClient(tracking_uri=uri)  # opens the store: creates or upgrades its schema
        c.search_experiments(max_results=1)
    finally:
        os.close(fd)  # releases the lock
    _OPENED.add(uri)
    return c


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI opens the runs table, not traces


def artifact_root(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite store (``<db folder>/mlruns``), not the cwd.

    MLflow's default for a file or sqlite store is ``./mlruns`` of whatever
    directory the process runs in; a server (``http://``) decides for itself (None).
    """
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent / "mlruns")
    return None


def experiment_id(cfg: StudyConfig) -> str:
    """The experiment's id, created when missing (by whichever of two commands started at once gets there first)."""
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        try:
            return c.create_experiment(cfg.tracking.experiment,
                                       artifact_location=artifact_root(cfg.tracking.mlflow_uri),
                                       tags=dict([EXPERIMENT_KIND]))
        except MlflowException:
            exp = c.get_experiment_by_name(cfg.tracking.experiment)
            if exp is None:
                raise
            return exp.experiment_id
    if exp.tags.get(EXPERIMENT_KIND[0]) is None:
        c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id
