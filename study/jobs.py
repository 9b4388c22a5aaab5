"""``study`` inside a Ray job (``ray job submit --working-dir . -- study ...``): no run left in Ray's temporary copy.

Ray runs a job's entrypoint in its own copy of the uploaded working directory,
``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``, and deletes that
copy with the session (and may delete it sooner, once no job uses it). A relative
``tracking.mlflow_uri`` (``sqlite:///mlflow.db``), ``ray.storage_path``
(``ray_results``), ``data.root`` or output folder would put the study's runs and
checkpoints there, and the printed UI hint would name a store the user cannot find.

Inside such a directory every relative location resolves against the *job home*
instead: ``$UNITSTUDY_HOME``, by default ``~/unitstudy`` of the node that runs the
job's driver (the head, unless the job asks for other resources). On a cluster
from ``cluster.yaml`` that is ``/home/ray/unitstudy``, the folder ``ray up`` syncs
the project to, so a job's relative defaults land where ``ray attach`` and
``cd /home/ray/unitstudy`` would have put them. Absolute paths and URIs
(``s3://``, ``http://``) are left as they are; outside a job nothing changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from trainables.errors import ConfigError

__all__ = ["DEFAULT_HOME", "HOME_ENV", "anchor", "anchored", "job_home", "job_note", "job_working_dir"]

HOME_ENV = "UNITSTUDY_HOME"
DEFAULT_HOME = "~/unitstudy"

Config = TypeVar("Config", bound=BaseModel)  # a study.config.StudyConfig (imported there, not here: no cycle)


def job_working_dir(cwd: str | Path | None = None) -> Path | None:
    """The Ray job's temporary working directory that ``cwd`` (default: this process's) lies in, or None."""
    parts = Path(cwd if cwd is not None else os.getcwd()).parts
    for i in range(2, len(parts)):
        if parts[i].startswith("_ray_pkg_") and parts[i - 2: i] == ("runtime_resources", "working_dir_files"):
            return Path(*parts[: i + 1])
    return None


def job_home() -> Path:
    """``$UNITSTUDY_HOME`` (default ``~/unitstudy``), absolute; a relative one is refused (it would resolve into
    the temporary directory it is meant to avoid)."""
    raw = os.environ.get(HOME_ENV) or DEFAULT_HOME
    home = Path(raw).expanduser()
    if not home.is_absolute():
        raise ConfigError(f"{HOME_ENV} = {raw} must be an absolute path (inside a Ray job a relative one would lie in "
                          "the job's temporary working directory)")
    return home


def anchor(path: str | Path) -> str:
    """``path`` as this process should use it: inside a Ray job's working directory, a relative local path under
    :func:`job_home`; anything else (outside a job, absolute, ``~/...``, a URI) unchanged."""
    text = str(path)
    if "://" in text or Path(text).expanduser().is_absolute() or job_working_dir() is None:
        return text
    return str(job_home() / text)


def _anchor_tracking_uri(uri: str) -> str:
    """A relative sqlite store (``sqlite:///mlflow.db``) or file store (``mlruns``) under the job home."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if path and not path.startswith(":memory:"):
            return "sqlite:///" + anchor(path)  # an absolute path gives sqlite:////abs/mlflow.db
        return uri
    if ":" in uri:  # another scheme (http://, file:, databricks): not a relative path
        return uri
    return anchor(uri)


def anchored(cfg: Config) -> Config:
    """``cfg`` with its relative locations under the job home when this process runs inside a Ray job's working
    directory; ``cfg`` itself otherwise."""
    if job_working_dir() is None:
        return cfg
    out = cfg.model_copy(deep=True)
    out.tracking.mlflow_uri = _anchor_tracking_uri(out.tracking.mlflow_uri)
    out.ray.storage_path = anchor(out.ray.storage_path)
    out.data.root = anchor(out.data.root)
    if out.dissection.broden_root:
        out.dissection.broden_root = anchor(out.dissection.broden_root)
    return out


def job_note() -> str | None:
    """One line saying where relative locations go, when this process runs inside a Ray job; else None."""
    where = job_working_dir()
    if where is None:
        return None
    return (f"note: running in a Ray job; relative paths (tracking.mlflow_uri, ray.storage_path, data.root, outputs) "
            f"resolve under {job_home()} (${HOME_ENV}), not in the job's temporary directory {where}")
