"""Input-gradient regularization: the squared norm of the loss gradient w.r.t. the input.

References:

* Drucker & LeCun 1992, "double backpropagation"; Ross & Doshi-Velez 2018,
  "Improving the Adversarial Robustness and Interpretability of Deep Neural
  Networks by Regularizing their Input Gradients": loss
  ``H(y, f(x)) + lambda * ||grad_x H(y, f(x))||_2^2``.
* Kim, Samith, Utama, section 3.3 (lambda = 0.1, L2); PAPER.md section 4.
* Finlay & Oberman 2019, "Scaleable input gradient regularization for
  adversarial robustness": the finite-difference estimate used by
  ``method="finite_difference"``.

Reduction. With ``l_i`` the cross-entropy of example ``i`` and ``g_i`` the
gradient of the summed loss ``sum_j l_j`` w.r.t. that example's input ``x_i``::

    ce      = (1/B) sum_i l_i                        (batch-mean cross-entropy)
    penalty = (1/B) sum_i ||g_i||_2^2                 (batch mean, batch-size invariant)

``g_i`` is ``B`` times the gradient of the batch-mean ``ce`` w.r.t. ``x_i``
(hence the gradient is taken of the sum). Without train-mode BatchNorm the
examples do not interact and ``g_i = grad_{x_i} l_i``; with it, ``g_i`` also
carries the (O(1/B)) terms through the batch statistics, which is what double
backprop differentiates in practice.

Lambda. Ross & Doshi-Velez write the objective summed over examples,
``sum_i l_i + lambda * sum_i ||grad_{x_i} l_i||^2``; dividing it by ``B`` gives
``ce + lambda * penalty``, so ``lambda`` here is the paper's lambda unchanged.
(The common shortcut ``||grad_x ce||^2`` over the whole batch tensor equals
``penalty / B``; a lambda' tuned for it corresponds to ``lambda = lambda' / B``.)

Methods:

* ``double_backprop`` (exact): ``torch.autograd.grad(sum_i l_i, x,
  create_graph=True)`` gives ``g``, then the caller runs one ordinary backward
  of ``ce + lambda * penalty`` through the second-order graph. Parameters
  receive gradients in that single backward only, so DDP's gradient hooks fire
  once per step.
* ``finite_difference`` (Finlay & Oberman): ``g`` without a second-order graph,
  ``v_i = g_i / ||g_i||`` (detached), one more forward at ``x + h v`` and
  ``penalty ~ (1/B) sum_i ((l_i(x + h v) - l_i(x)) / h)^2``, exact as h -> 0
  without BatchNorm coupling (a forward difference: O(h) bias). The caller's one
  backward goes through both forward graphs. The second forward replays the
  first one's randomness (the global RNG state for dropout, the recorded masks
  of :class:`FocusedDropout`), so the difference measures the input change only;
  under DDP it runs on the wrapped module, so DDP neither re-broadcasts buffers
  nor expects a second backward. Under bf16/fp16 autocast the difference of two
  low-precision losses would be noise, so this method runs its forwards in float32
  (autocast off inside; tested against float32 on the CPU).

Cost, in forwards F, input-only backwards Bx and full backwards B of a plain
step ``F + B``: the exact method is ``F + Bx`` (with graph) plus one backward
through both the forward and the first backward (double backward of every conv
and of train-mode BatchNorm, whose PyTorch formula is a long chain of unfused
elementwise ops); the finite difference is ``2F + Bx + 2B`` (its one backward
traverses two forward graphs), so at least twice a plain step whatever the
implementation. ``benchmarks/regularizers.py`` measures both.

BatchNorm statistics. The extra forward (finite difference) must not move the
running statistics a second time: during it every tracking BatchNorm runs with
``momentum = 0.0`` (running stats kept bit-exact by the kernel, no in-place
write that would invalidate the first graph), and ``num_batches_tracked`` is
restored afterwards. This is local to each rank and needs no communication, so
it is correct under DDP and with SyncBatchNorm. The exact method has a single
forward and needs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from trainables.errors import ConfigError
from trainables.focused_dropout import FocusedDropout

__all__ = ["METHODS", "input_gradient_penalty", "penalized_forward", "frozen_batchnorm_stats"]

METHODS = ("double_backprop", "finite_difference")
Method = Literal["double_backprop", "finite_difference"]


@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave every BatchNorm's running statistics as they were."""
    saved = [
        (m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    ]
    for m, _, _ in saved:
        m.momentum = 0.0  # running = 1 * running + 0 * batch, exactly
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, count in saved:
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)


@contextmanager
def _replayed_randomness(model: nn.Module, rng_state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Replay the stochastic layers of the previous forward: same dropout and FocusedDropout masks."""
    after = _rng_state(rng_state.keys())
    _set_rng_state(rng_state)
    focused = [m for m in model.modules() if isinstance(m, FocusedDropout)]
    for m in focused:
        m.replay = True
    try:
        yield
    finally:
        for m in focused:
            m.replay = False
        _set_rng_state(after)


def _rng_state(devices: Iterable[str]) -> dict[str, torch.Tensor]:
    """Global RNG state of the CPU and of the CUDA devices named ``cuda:i``."""
    return {d: torch.get_rng_state() if d == "cpu" else torch.cuda.get_rng_state(d) for d in devices}


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    for d, s in state.items():
        if d == "cpu":
            torch.set_rng_state(s)
        else:
            torch.cuda.set_rng_state(s, d)


def _devices(x: torch.Tensor) -> set[str]:
    if x.device.type != "cuda":
        return {"cpu"}
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return {"cpu", f"cuda:{index}"}


def penalized_forward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    method: Method = "double_backprop",
    h: float = 0.01,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, ce, penalty)`` for one batch; see the module docstring for definitions.

    ``x`` is ``(B, ...)`` inputs, ``y`` is ``(B,)`` class indices. ``logits``
    are those of the ordinary forward at ``x``; ``ce + lam * penalty`` is ready
    for one ``.backward()``. ``grad_scale`` (fp16 training: the GradScaler's
    current scale as a tensor) multiplies the loss before the inner gradient and
    divides it out after, as PyTorch's AMP recipe for gradient penalties does, so
    the fp16 backward of the inner gradient does not underflow.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown gradient-penalty method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "finite_difference" and not h > 0:
        raise ConfigError(f"finite-difference step h = {h} must be > 0")
    if method == "finite_difference" and torch.is_autocast_enabled(x.device.type):
        # Two bf16/fp16 losses differing by h * ||g|| ~ 1e-2 are below their resolution: the estimate
        # would be noise. The finite-difference step runs in float32 whatever the autocast setting.
        with torch.autocast(x.device.type, enabled=False):
            return penalized_forward(model, x.float(), y, method, h)  # float32: no scaling needed
    x = x.detach().requires_grad_(True)  # (B, ...)
    rng = _rng_state(_devices(x)) if method == "finite_difference" else {}
    logits = model(x)  # (B, K)
    ce_each = F.cross_entropy(logits, y, reduction="none")  # (B,)
    create_graph = method == "double_backprop"
    inner = ce_each.sum() if grad_scale is None else ce_each.sum() * grad_scale
    (grad,) = torch.autograd.grad(inner, x, create_graph=create_graph, retain_graph=True)  # (B, ...)
    if grad_scale is not None:
        grad = grad / grad_scale
    if method == "double_backprop":
        penalty = grad.flatten(1).pow(2).sum(1).mean()  # (B,) -> ()
        return logits, ce_each.mean(), penalty
    g = grad.flatten(1)  # (B, D), no graph
    v = (g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)).view_as(x)  # unit rows
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    with frozen_batchnorm_stats(inner), _replayed_randomness(inner, rng):
        ce_step = F.cross_entropy(inner(x.detach() + h * v), y, reduction="none")  # (B,)
    slope = (ce_step - ce_each) / h  # (B,) directional derivative along v ~ ||g_i||
    return logits, ce_each.mean(), slope.pow(2).mean()


def input_gradient_penalty(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    method: Method = "double_backprop",
    h: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce, penalty)``: batch-mean cross-entropy and batch-mean squared input-gradient norm.

    Both are scalars with graphs; the caller runs one backward of
    ``ce + lam * penalty``. ``method`` is ``"double_backprop"`` (exact) or
    ``"finite_difference"`` (step ``h`` along the normalized input gradient).
    """
    _, ce, penalty = penalized_forward(model, x, y, method, h)
    return ce, penalty
