"""Training checkpoints as plain dicts, loadable with ``torch.load(weights_only=True)``.

Layout (after torchvision's references/classification/train.py)::

    {"model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
     "epoch": int, "config": dict of JSON-able values, **extra}

``config`` must hold only plain Python values (``StudyConfig.model_dump(mode="json")``)
so the file loads under ``weights_only=True``. Writes are atomic: a crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainables.errors import CheckpointError


def checkpoint_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int = 0,
    config: dict | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The checkpoint dict; unwraps DDP (``model.module``) so keys carry no ``module.``."""
    model = getattr(model, "module", model)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "config": dict(config or {}),
        **extra,
    }


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint to {path.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({first[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj
