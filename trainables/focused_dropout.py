"""FocusedDropout: keep only where the most active channel is strongly active.

References:

* Liu et al. 2022, "FocusedDropout for Convolutional Neural Network"
  (Applied Sciences 12(15):7682): the method and its participation rate.
* Kim, Samith, Utama, "Improving Network Accuracy via Input Gradients and
  FocusedDropout", section 3.2 and Algorithm 1; as specified for this project in
  PAPER.md section 3.

Algorithm 1, per image with channels ``c_1..c_n`` of shape ``(H, W)``:

1. ``w_i`` = spatial mean of ``c_i``; ``k = argmax_i w_i`` (first on ties);
2. ``m_max`` = maximum of ``c_k`` over positions;
3. ``gamma ~ U(lo, hi)`` (default ``(0.6, 0.9)``, Algorithm 1; the FocusedDropout
   paper's text says ``(0.3, 0.6)``, hence configurable);
4. ``mask(i, j) = 1`` where ``c_k(i, j) > gamma * m_max`` (strict), else 0;
5. output ``C * mask``: the same spatial mask for every channel, no rescaling.

Choices the papers leave open, made here:

* gamma is drawn once per image (not once per batch or per channel), so the
  images of one batch are cut at different levels;
* the mask is computed from detached activations: it is a constant for autograd
  (gradient flows through the kept positions only), as in dropout;
* the decision to participate (a share ``par_rate`` of training mini-batches)
  and the gammas come from a ``torch.Generator`` owned by the module and seeded
  at construction, so runs repeat. DDP ranks built with the same seed make the
  same decision each step, so the global mini-batch participates as a whole.
  The generator is not part of the state dict (checkpoints stay loadable into a
  plain VGG); reseed it with ``module.generator.manual_seed(...)`` on resume;
* if a participating image's top channel has no position above
  ``gamma * m_max`` (e.g. an all-zero or all-negative channel), the mask is all
  zero, exactly as Algorithm 1 reads.

Inference returns the input unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from trainables.errors import ConfigError

__all__ = ["FocusedDropout", "focused_dropout", "focused_dropout_mask"]


def _check_gamma(gamma_lo: float, gamma_hi: float) -> None:
    if not (0 < gamma_lo <= gamma_hi < 1):
        raise ConfigError(
            f"FocusedDropout gamma range ({gamma_lo}, {gamma_hi}) is invalid; need 0 < lo <= hi < 1"
        )


def focused_dropout_mask(
    x: torch.Tensor, gamma_lo: float, gamma_hi: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The binary mask of Algorithm 1, shape ``(B, 1, *spatial)``, in ``x``'s dtype.

    ``x`` is ``(B, C, *spatial)``. gamma is drawn per image from ``U(lo, hi)``
    with ``generator`` (on the generator's device, then moved to ``x``'s);
    ``lo == hi`` fixes it. Statistics are taken in at least float32, so bf16 and
    fp16 activations (autocast) are ranked and thresholded without rounding.
    """
    if x.dim() < 3:
        raise ConfigError(
            f"FocusedDropout needs (batch, channels, *spatial) activations, got shape {tuple(x.shape)}; "
            "place it after a convolutional layer"
        )
    _check_gamma(gamma_lo, gamma_hi)
    b = x.shape[0]
    dtype = torch.promote_types(x.dtype, torch.float32)
    acts = x.detach().flatten(2)  # (B, C, S)
    k = acts.mean(dim=2, dtype=dtype).argmax(dim=1)  # (B,) highest-mean channel
    focus = acts[torch.arange(b, device=x.device), k].to(dtype)  # (B, S)
    m_max = focus.amax(dim=1, keepdim=True)  # (B, 1)
    rng_device = generator.device if generator is not None else x.device
    gamma = torch.empty(b, 1, dtype=dtype, device=rng_device).uniform_(gamma_lo, gamma_hi, generator=generator)
    keep = focus > gamma.to(x.device, non_blocking=True) * m_max  # (B, S), strict as in Algorithm 1
    return keep.to(x.dtype).view(b, 1, *x.shape[2:])  # (B, 1, *spatial)


def focused_dropout(
    x: torch.Tensor, gamma_lo: float = 0.6, gamma_hi: float = 0.9, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply Algorithm 1 to every image of ``x`` (``(B, C, *spatial)``): ``x * mask``, dtype kept."""
    return x * focused_dropout_mask(x, gamma_lo, gamma_hi, generator)


class FocusedDropout(nn.Module):
    """FocusedDropout on a share ``par_rate`` of training mini-batches; identity otherwise.

    Args:
        par_rate: participation rate, the share of training mini-batches it acts on (paper: 0.1).
        gamma: ``(lo, hi)`` of the per-image uniform threshold ratio.
        seed: seed of the module's own generator (participation and gammas).
    """

    def __init__(self, par_rate: float, gamma: tuple[float, float] = (0.6, 0.9), seed: int = 0) -> None:
        super().__init__()
        if not 0 <= par_rate <= 1:
            raise ConfigError(f"FocusedDropout par_rate = {par_rate} is out of range; allowed: [0, 1]")
        if len(gamma) != 2:
            raise ConfigError(f"FocusedDropout gamma must be a (lo, hi) pair, got {gamma!r}")
        lo, hi = float(gamma[0]), float(gamma[1])
        _check_gamma(lo, hi)
        self.par_rate = float(par_rate)
        self.gamma = (lo, hi)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)  # CPU: deciding costs no device sync
        self.replay = False  # when set, reuse the previous forward's mask (finite-difference passes)
        self.last_mask: torch.Tensor | None = None  # (B, 1, *spatial), None when it did not participate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if not self.training or self.par_rate == 0:
            return x
        if not self.replay:
            participates = torch.rand((), generator=self.generator).item() < self.par_rate
            self.last_mask = focused_dropout_mask(x, *self.gamma, self.generator) if participates else None
        return x if self.last_mask is None else x * self.last_mask

    def extra_repr(self) -> str:
        return f"par_rate={self.par_rate}, gamma={self.gamma}, seed={self.seed}"
