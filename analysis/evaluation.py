"""Model loading and plain evaluation for the analyses: per-class correct counts.

:func:`model_from_state_dict` builds the VGG-16 a checkpoint's state dict
belongs to (checked against the expected architecture);
:func:`evaluate_class_counts` runs one plain evaluation pass and returns its
:class:`~analysis.counts.ClassCounts`. The helpers below it are shared with the
ablation engine (:mod:`analysis.ablation`) and the interventions
(:mod:`analysis.intervention`): where to compute (:func:`resolve_device`,
:func:`prepared_model`), the batches moved there (:func:`batches_on`), and
per-class hit counts (:func:`class_hits`, :func:`check_model_classes`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from analysis.counts import ClassCounts
from analysis.hooks import eval_mode
from trainables.errors import CheckpointError, ConfigError, DataError
from trainables.models import convert_state_dict, infer_architecture, load_vgg16_state_dict, vgg16

__all__ = [
    "Batches",
    "batches_on",
    "check_model_classes",
    "class_hits",
    "evaluate_class_counts",
    "model_from_state_dict",
    "prepared_model",
    "resolve_device",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- models


def model_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device,
    **expected: object,
) -> nn.Sequential:
    """The VGG-16 a state dict belongs to, built and loaded strictly, on ``device``, in eval mode.

    For a Ray task that receives the checkpoint's state dict (``ray.put`` once).
    Accepts a checkpoint dict (``{"model": ...}``) and the key spellings of
    :func:`trainables.models.convert_state_dict`. ``expected`` (any of variant,
    batch_norm, width, num_classes) is checked against what the weights say: a
    checkpoint of another architecture or class count is one CheckpointError.
    """
    unknown = set(expected) - {"variant", "batch_norm", "width", "num_classes"}
    if unknown:
        raise ConfigError(f"unknown architecture field(s) {sorted(unknown)}")
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
    batch_norm = any(k.endswith("running_mean") for k in state_dict)
    arch = infer_architecture(convert_state_dict(state_dict, batch_norm))
    for key, want in expected.items():
        if want is not None and arch[key] != want:
            raise CheckpointError(
                f"the checkpoint is a VGG-16 with {key}={arch[key]}, but {key}={want} was expected "
                "(a checkpoint of another model or dataset?)"
            )
    model = vgg16(arch["variant"], batch_norm=arch["batch_norm"], width=arch["width"],
                  num_classes=arch["num_classes"])
    load_vgg16_state_dict(model, state_dict)
    return model.to(device).eval()


def evaluate_class_counts(
    model: nn.Module,
    batches: Batches,
    *,
    device: str | torch.device,
    num_classes: int,
    dtype: torch.dtype | None = None,
) -> ClassCounts:
    """Per-class correct counts of one plain evaluation pass (eval mode, no grad)."""
    check_model_classes(model, num_classes)
    work = prepared_model(model, device, dtype)
    dev = resolve_device(device)
    wdtype = next(work.parameters()).dtype
    correct = torch.zeros(num_classes, dtype=torch.long, device=dev)
    total = torch.zeros(num_classes, dtype=torch.long, device=dev)
    with eval_mode(work), torch.no_grad():
        for x, y in batches_on(batches, dev, wdtype, num_classes):
            correct += class_hits(y, work(x).argmax(1) == y, num_classes)
            total += torch.bincount(y, minlength=num_classes)
    return ClassCounts(correct.cpu(), total.cpu())


# --------------------------------------------------------------------------- plumbing


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def prepared_model(model: nn.Module, device: str | torch.device, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself if it already lives on ``device`` in ``dtype``; else a moved copy (caller's model untouched)."""
    device = resolve_device(device)
    param = next(model.parameters())
    dtype = dtype or param.dtype
    if param.device == device and all(p.dtype == dtype for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def batches_on(batches: Batches, device: torch.device, dtype: torch.dtype, num_classes: int) -> Iterator:
    """(images, labels) moved to ``device``; images cast to ``dtype``; labels checked against ``num_classes``."""
    for x, y in batches:
        x = x.to(device=device, dtype=dtype, non_blocking=True)
        y = torch.as_tensor(y).to(device=device, dtype=torch.long, non_blocking=True)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(
                f"a label ({int(y.min())}..{int(y.max())}) is outside 0..{num_classes - 1}; "
                "is num_classes right for this dataset?"
            )
        yield x, y


def class_hits(y: torch.Tensor, hit: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) number of ``hit`` images per class ``y``."""
    return torch.zeros(num_classes, dtype=torch.long, device=y.device).index_add_(0, y, hit.long())


def check_model_classes(model: nn.Module, num_classes: int) -> None:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if last and last[-1].out_features != num_classes:
        raise ConfigError(
            f"the model has {last[-1].out_features} outputs but num_classes is {num_classes}; "
            "use the checkpoint's class count"
        )
