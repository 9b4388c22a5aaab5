"""The training loop's integration point for the paper's regularizers.

Two functions, both reading the typed sections of :mod:`trainables.config` (a
plain ``StudyConfig.dump()`` dict is validated into them first):

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

from trainables.config import RegularizationConfig, WorkerConfig, as_section
from trainables.errors import ConfigError
from trainables.focused_dropout import FocusedDropout
from trainables.gradient_penalty import penalized_forward
from trainables.models import insert_after, vgg16

__all__ = ["build_model", "batch_loss"]


def build_model(cfg: WorkerConfig | Mapping[str, Any], num_classes: int | None = None) -> nn.Sequential:
    """VGG-16 with the configured regularizers, from a :class:`WorkerConfig` (or a ``StudyConfig.dump()``).

    Classes: ``model.num_classes`` when set, else ``num_classes`` (the dataset's
    count, ``StudyConfig.num_classes``), else the worker config's own resolved
    count. FocusedDropout's generator is seeded with ``train.seed``, the same on
    every rank.
    """
    cfg = as_section(WorkerConfig, cfg)
    model_cfg, reg = cfg.model, cfg.regularization
    classes = model_cfg.num_classes or num_classes or cfg.num_classes
    if classes is None:
        raise ConfigError("the class count is unknown; set model.num_classes or pass the dataset's num_classes")
    model = vgg16(
        model_cfg.variant,
        batch_norm=model_cfg.batch_norm,
        width=model_cfg.width,
        num_classes=classes,
        dropout=reg.dropout.rate,
    )
    fd = reg.focused_dropout
    if fd.par_rate > 0:
        module = FocusedDropout(fd.par_rate, tuple(fd.gamma), seed=cfg.train.seed)
        model = insert_after(model, fd.site, "focused_dropout", module)
    return model


def batch_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, reg_cfg: RegularizationConfig | Mapping[str, Any],
    step: int = 0,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, logits, metrics)`` of one training batch.

    ``x`` is ``(B, C, H, W)``, ``y`` is ``(B,)``; ``reg_cfg`` is the
    ``regularization`` section (typed; a dict is validated first). ``loss = ce + lambda * penalty`` (batch means;
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
    gp = as_section(RegularizationConfig, reg_cfg).gradient_penalty
    lam, method, h, every = gp.lam, gp.method, gp.h, gp.every
    if lam == 0 or step % every:
        logits = model(x)  # (B, K)
        ce = F.cross_entropy(logits, y)
        return ce, logits, {"ce": ce.detach()}
    logits, ce, penalty = penalized_forward(model, x, y, method, h, grad_scale=grad_scale)
    loss = ce + every * lam * penalty
    return loss, logits, {"ce": ce.detach(), "penalty": penalty.detach()}
