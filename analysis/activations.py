"""A layer's unit activations for network dissection, batch by batch, in bounded chunks.

Shared by the threshold pass (:mod:`analysis.thresholds`) and the IoU pass
(:mod:`analysis.dissection`): :func:`layer_acts` runs the network up to the
dissected layer only; :func:`batch_acts` pairs each batch's activations (or ones
kept from an earlier pass) with its concept label maps; :func:`image_chunks`
splits a batch so that one upsampled (images, units, positions) chunk stays
within :data:`CHUNK_ELEMENTS`.

Pruning: most (image, unit) pairs never come near a unit's threshold. Bilinear
values are convex combinations of the map's own values, so no upsampled value
of a pair exceeds its map's peak (:func:`peak_bound` adds the few ulps that
rounding can add). The passes compare that bound with a threshold (or a running
lower bound of it) and upsample only the pairs that can matter
(:func:`pair_values`, in :func:`image_chunks` of pairs); they give the same results as
upsampling every pair, because :func:`analysis.upsample.upsample_rows` computes
each map's values by elementwise arithmetic on that map alone (the same bits in
any batch, on any machine).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from analysis.hooks import retain_layers, unit_layer
from analysis.upsample import upsample_rows
from trainables.errors import ConfigError, DataError

__all__ = [
    "CHUNK_ELEMENTS",
    "batch_acts",
    "image_chunks",
    "layer_acts",
    "on_device",
    "pair_values",
    "peak_bound",
]

# Elements of one upsampled (images, units, positions) chunk: 2**24 (64 MiB float32).
CHUNK_ELEMENTS = 2**24


class _Stop(Exception):
    """Raised by a hook to end the forward pass at the dissected layer."""


def on_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` when it is already on ``device``, else a copy moved there (the caller's model is left alone)."""
    p = next(iter(model.parameters()), None)
    if p is None or p.device == torch.device(device):
        return model
    return copy.deepcopy(model).to(device)


def _site(model: nn.Module, layer: str) -> str:
    """The module carrying ``layer``'s units (``conv5_3`` -> ``relu5_3``); other models: ``layer`` as is."""
    return unit_layer(model, layer) if isinstance(model, nn.Sequential) else layer


def layer_acts(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """(B, U, h, w) float32 activations of ``layer``'s units for images ``x``; stops the forward pass there."""
    site = _site(model, layer)
    with retain_layers(model, [site]) as acts:
        from trainables.models import resolve_layer

        def stop(_m, _i, _o):
            raise _Stop

        handle = resolve_layer(model, site).register_forward_hook(stop)
        try:
            model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
    a = acts[site]
    if a.dim() != 4:
        raise ConfigError(f"dissection needs a conv layer's (B, C, H, W) output; '{layer}' gives {tuple(a.shape)}")
    return a.float()


def image_chunks(b: int, per_image: int) -> list[tuple[int, int]]:
    """(lo, hi) ranges of ``b`` images (or (image, unit) pairs) whose (items x ``per_image``) elements stay
    within :data:`CHUNK_ELEMENTS`."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_image))
    return [(i, min(b, i + step)) for i in range(0, b, step)]


def batch_acts(model, layer, batches, acts, device):
    """(acts, labels) per batch: ``acts[i]`` when given (pass 2 reusing pass 1), else the model's."""
    for i, (x, labels) in enumerate(batches):
        labels = labels.to(device)
        if labels.dim() == 3:
            labels = labels[:, None]
        if acts is not None:
            a = acts[i].to(device)
        else:
            a = layer_acts(model, layer, x.to(device))
        if a.shape[0] != labels.shape[0]:
            raise DataError(f"a batch has {a.shape[0]} images but {labels.shape[0]} label maps")
        if not bool(torch.isfinite(a).all()):  # NaN would also defeat the peak bounds the passes prune by
            raise DataError(f"{layer}'s activations hold NaN or inf on batch {i} ({a.shape[0]} images): "
                            "the checkpoint's weights or the images are broken")
        yield a, labels


def peak_bound(peaks: torch.Tensor) -> torch.Tensor:
    """An upper bound on every bilinearly upsampled value of maps whose largest values are ``peaks``.

    Bilinear weights are non-negative and sum to 1, so an upsampled value is at
    most the map's peak; in float32 the weights may sum to 1 plus a few ulps, so
    the bound adds 2**-20 of the peak (16 ulps) and the smallest normal float. A
    zero peak stays 0: weighted sums of values <= 0 stay <= 0.
    """
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(peaks == 0, peaks, peaks + peaks.abs() * 2.0**-20 + tiny)


def pair_values(acts: torch.Tensor, image: torch.Tensor, unit: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, P) the values of the (image, unit) pairs ``acts[image[i], unit[i]]`` at ``size`` (P = H W):
    upsampled, or the map itself when ``size`` is its own."""
    return upsample_rows(acts[image, unit], size)
