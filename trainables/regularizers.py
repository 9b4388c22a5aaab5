"""The training loop's integration point for the paper's regularizers.

Two functions, both reading the plain dicts of ``StudyConfig.dump()``:

* :func:`build_model`: VGG-16 from the ``model`` section, with dropout at the
  head's sites (``regularization.dropout.rate``, the paper's "Dropout rate 0.2")
  and, when ``par_rate > 0``, a :class:`FocusedDropout` called
  ``"focused_dropout"`` right after ``regularization.focused_dropout.site``.
* :func:`batch_loss`: the total loss of one batch,
  ``ce + lambda * penalty`` (the input-gradient penalty, skipped at lambda = 0),
  ready for one ``.backward()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.errors import ConfigError
from trainables.focused_dropout import FocusedDropout
from trainables.gradient_penalty import METHODS, penalized_forward
from trainables.models import insert_after, vgg16

__all__ = ["build_model", "batch_loss"]


def build_model(cfg: Mapping[str, Any], num_classes: int | None = None) -> nn.Sequential:
    """VGG-16 with the configured regularizers, from a ``StudyConfig.dump()`` dict.

    Classes: ``cfg["model"]["num_classes"]`` when set, else ``num_classes`` (the
    dataset's count, ``StudyConfig.num_classes``). FocusedDropout's generator is
    seeded with ``cfg["train"]["seed"]`` (0 when absent), the same on every rank.
    """
    model_cfg, reg = cfg["model"], cfg["regularization"]
    classes = model_cfg.get("num_classes") or num_classes
    if classes is None:
        raise ConfigError("the class count is unknown; set model.num_classes or pass the dataset's num_classes")
    model = vgg16(
        model_cfg["variant"],
        batch_norm=model_cfg["batch_norm"],
        width=model_cfg["width"],
        num_classes=classes,
        dropout=reg["dropout"]["rate"],
    )
    fd = reg["focused_dropout"]
    if fd["par_rate"] > 0:
        seed = cfg.get("train", {}).get("seed", 0)
        module = FocusedDropout(fd["par_rate"], tuple(fd["gamma"]), seed=seed)
        model = insert_after(model, fd["site"], "focused_dropout", module)
    return model


def batch_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, reg_cfg: Mapping[str, Any], step: int = 0,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, logits, metrics)`` of one training batch.

    ``x`` is ``(B, C, H, W)``, ``y`` is ``(B,)``; ``reg_cfg`` is the
    ``regularization`` section. ``loss = ce + lambda * penalty`` (batch means;
    see :mod:`trainables.gradient_penalty`), with the penalty's forward skipped
    when lambda is 0. Lazy regularization (StyleGAN2's R1 schedule): with
    ``gradient_penalty.every = k`` the penalty term is computed on the steps
    where ``step % k == 0`` only, weighted ``k * lambda`` so its expected
    gradient is unchanged; ``step`` (the optimizer step since training began)
    is the same on every DDP rank, so the ranks agree. ``metrics`` holds
    ``"ce"`` and, when computed, ``"penalty"`` as detached 0-dim tensors on the
    batch's device (no host sync: the caller sums them and syncs once per epoch).
    ``grad_scale``: fp16 loss scale for the inner gradient (see
    :func:`trainables.gradient_penalty.penalized_forward`).
    """
    gp = reg_cfg["gradient_penalty"]
    lam, method, h, every = float(gp["lambda"]), gp["method"], float(gp["h"]), int(gp.get("every", 1))
    if lam < 0:
        raise ConfigError(f"regularization.gradient_penalty.lambda = {lam} must be >= 0")
    if method not in METHODS:
        raise ConfigError(f"unknown gradient-penalty method '{method}'; choose one of {', '.join(METHODS)}")
    if every < 1:
        raise ConfigError(f"regularization.gradient_penalty.every = {every} must be >= 1")
    if lam == 0 or step % every:
        logits = model(x)  # (B, K)
        ce = F.cross_entropy(logits, y)
        return ce, logits, {"ce": ce.detach()}
    logits, ce, penalty = penalized_forward(model, x, y, method, h, grad_scale=grad_scale)
    loss = ce + every * lam * penalty
    return loss, logits, {"ce": ce.detach(), "penalty": penalty.detach()}
