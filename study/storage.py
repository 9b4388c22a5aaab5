"""Remote storage (``s3://``, ``gs://``) from the driver's side: checked before Ray starts, URIs kept whole.

A multi-node cluster needs shared storage for Ray's checkpoints (DESIGN.md);
``ray.storage_path: s3://bucket/prefix`` is what ``configs/sweep.yaml`` uses.
Ray reaches it through pyarrow's file systems, and so does this module, so the
endpoint and the credentials come from the same place for both: the standard
variables (``AWS_ENDPOINT_URL`` for an S3-compatible store other than AWS,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, an instance profile).

* :func:`check_writable` writes and deletes one probe object: a missing bucket or
  refused credentials is one error naming the storage path, before Ray starts.
* :func:`worker_env` is what the driver hands its Ray job (``runtime_env``), so
  workers on other nodes write to the same endpoint with the same credentials.
* :func:`as_uri` puts the scheme back on a path Ray reports (Ray Train's
  ``Checkpoint.path`` is ``bucket/prefix/...`` without ``s3://``).
* :func:`fetch` copies one remote file to a local path, whole or not at all.
* :func:`newest_checkpoint` finds a trial's newest checkpoint and its epoch history
  (``history.json``), local or remote, for the driver's MLflow reconciliation.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from trainables.errors import CheckpointError, ConfigError

__all__ = ["WORKER_ENV", "as_uri", "check_writable", "fetch", "is_remote", "latest_folder", "newest_checkpoint",
           "worker_env"]

# The variables that say which object store and with which credentials. Set where `study` runs, they are
# passed to every process of its Ray job (runtime_env env_vars); a node's own environment and instance
# profile serve when they are unset here.
WORKER_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_APPLICATION_CREDENTIALS",
)

_AWS_ERROR = re.compile(r"AWS Error (\w+) during \w+ operation: ?([^(;]*)")
_CREDENTIALS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "MISSING_AUTHENTICATION_TOKEN",
                "EXPIRED_TOKEN", "UNRECOGNIZED_CLIENT", "INVALID_CLIENT_TOKEN_ID")


def is_remote(uri: str) -> bool:
    return "://" in uri


def worker_env() -> dict[str, str]:
    """The storage variables set in this process, to hand to the Ray job's workers."""
    return {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}


def as_uri(storage: str, path: str) -> str:
    """``path`` as Ray reports it under ``storage``, with ``storage``'s scheme: ``bucket/p/x`` -> ``s3://bucket/p/x``.

    Local storage and paths that already carry a scheme are returned unchanged.
    """
    if not is_remote(storage) or is_remote(path):
        return path
    scheme = storage.split("://", 1)[0]
    return f"{scheme}://{path.lstrip('/')}"


def _reason(exc: Exception) -> tuple[str, str | None]:
    """(a short reason, the AWS error code when there is one) for a pyarrow file-system error."""
    text = str(exc).strip()
    m = _AWS_ERROR.search(text)
    if m:
        code, message = m.group(1), m.group(2).strip().rstrip(".")
        if not message or message == "No response body":
            message = code.replace("_", " ").lower()
        return f"{code}: {message}", code
    return (text.splitlines()[0][:200] if text else type(exc).__name__), None


def _hint(code: str | None) -> str:
    if code == "NO_SUCH_BUCKET":
        return "create the bucket or name one that exists"
    if code in _CREDENTIALS:
        return ("check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the node's instance "
                "profile) and that they may write there")
    if code == "NETWORK_CONNECTION":
        return "check AWS_ENDPOINT_URL (an S3-compatible store) or the network"
    return "check the URI, the endpoint (AWS_ENDPOINT_URL) and the credentials"


def _filesystem(uri: str, what: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError, TypeError) as exc:  # unknown scheme, malformed URI
        reason, _ = _reason(exc)
        raise ConfigError(f"{what} = {uri} is not a storage URI this machine can open ({reason})") from None


def check_writable(uri: str, what: str = "ray.storage_path") -> None:
    """Write and delete one small object under ``uri``; a refusal is one :class:`ConfigError` naming ``uri``."""
    fs, path = _filesystem(uri, what)
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as exc:
        reason, code = _reason(exc)
        raise ConfigError(f"{what} = {uri} cannot be written ({reason}); {_hint(code)}") from None


def fetch(uri: str, dst: Path) -> Path:
    """Copy the remote file ``uri`` to ``dst`` (a temporary name, then renamed: whole or not at all)."""
    fs, path = _filesystem(uri, "the checkpoint")
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.part")
    try:
        with fs.open_input_stream(path) as src, open(part, "wb") as out:
            while block := src.read(1 << 22):
                out.write(block)
        os.replace(part, dst)
    except OSError as exc:
        part.unlink(missing_ok=True)
        reason, code = _reason(exc)
        if isinstance(exc, FileNotFoundError) or "not found" in reason.lower() or code == "NO_SUCH_KEY":
            raise CheckpointError(f"there is no file at {uri} ({reason})") from None
        raise CheckpointError(f"cannot read {uri} ({reason}); {_hint(code)}") from None
    return dst


def latest_folder(uri: str, prefix: str, marker: str) -> str | None:
    """The name of the folder under ``uri`` starting with ``prefix`` whose ``marker`` file is newest, or None."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri, "the storage")
    try:
        folders = [i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)]
        marked = [(m.mtime, f.base_name) for f in folders
                  if (m := fs.get_file_info(f"{f.path}/{marker}")).type == pafs.FileType.File]
    except OSError as exc:
        reason, code = _reason(exc)
        raise ConfigError(f"cannot list {uri} ({reason}); {_hint(code)}") from None
    return max(marked, key=lambda t: (t[0] is not None, t[0] or 0, t[1]))[1] if marked else None


def newest_checkpoint(storage: str | None, trial_id: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(URI, epoch history) of the newest readable checkpoint of trial ``trial_id``'s Train run under ``storage``
    (a local path or a remote URI such as ``s3://bucket/prefix``); (None, []) when there is none."""
    import pyarrow.fs as pafs

    from trainables.loop import HISTORY_FILE

    if not storage:
        return None, []
    root = f"{storage.rstrip('/')}/train-{trial_id}"
    try:
        fs, path = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return None, []
    names = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_")), reverse=True)  # names sort by time
    for name in names:  # the newest one whose history is whole (a kill may cut a checkpoint's upload)
        try:
            with fs.open_input_stream(f"{name}/{HISTORY_FILE}") as f:
                history = json.loads(f.read())
        except (OSError, ValueError):
            continue
        return (f"{root.split('://')[0]}://{name}" if "://" in root else name), history
    return None, []
