"""Bilinear upsampling of unit activation maps to the concept-mask resolution (network dissection).

:func:`upsample` is ``F.interpolate(..., mode="bilinear", align_corners=False)``,
done as one matmul with the interpolation kernel for small maps;
:func:`upsample_rows` upsamples a stack of single maps (the (image, unit) pairs
the dissection passes pick, :mod:`analysis.activations`) and
:func:`upsample_unit_major` gives the same values reordered unit-major.

Each output map depends only on its own input map, to the bit: a map upsampled
alone, in any subset or in a whole batch gives the same values (tested), so
passes that upsample different subsets of pairs compare equal values with the
same thresholds. (The matmul path pads a single map to two rows: BLAS takes a
matrix-vector path for one row, whose sums may round differently.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["upsample", "upsample_rows", "upsample_unit_major"]


# Source positions up to which upsampling is one matmul with the Kronecker product of the
# two axes' interpolation matrices (faster than F.interpolate on CPUs for small maps).
_MATMUL_SOURCE = 64


def _axis_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) bilinear weights along one axis, half-pixel centres, edges clamped (align_corners=False)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    lam = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - lam
    m[torch.arange(n_out), i1] += lam
    return m


_KERNELS: dict = {}


def _kernel(h: int, w: int, size: tuple[int, int], device, dtype) -> torch.Tensor:
    key = (h, w, size, str(device), dtype)
    if key not in _KERNELS:
        k = torch.kron(_axis_matrix(h, size[0]), _axis_matrix(w, size[1]))  # (H W, h w)
        _KERNELS[key] = k.t().contiguous().to(device=device, dtype=dtype)  # (h w, H W)
    return _KERNELS[key]


def upsample_rows(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, h, w) single maps -> (n, H W) bilinear (align_corners=False); row i depends on ``maps[i]`` alone."""
    n, h, w = maps.shape
    size = tuple(size)
    if (h, w) == size:
        return maps.reshape(n, h * w).clone()
    if h * w <= _MATMUL_SOURCE:
        k = _kernel(h, w, size, maps.device, maps.dtype)
        flat = maps.reshape(n, h * w)
        if n == 1:  # two rows keep BLAS on its matrix-matrix path (see the module docstring)
            return (flat.repeat(2, 1) @ k)[:1]
        return flat @ k
    return F.interpolate(maps.reshape(n, 1, h, w), size=size, mode="bilinear", align_corners=False).view(n, -1)


def upsample(acts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, U, h, w) -> (B, U, H, W) bilinear (align_corners=False), as both passes see ``a_u``.

    Small maps (h w <= 64, e.g. conv5_3 of the cifar VGG, 2x2) go through one
    matmul with the interpolation kernel; larger ones through ``F.interpolate``.
    """
    b, u, h, w = acts.shape
    if (h, w) == tuple(size):
        return acts
    return upsample_rows(acts.reshape(b * u, h, w), size).view(b, u, *size)


def upsample_unit_major(acts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(b, U, h, w) -> (U, b * P) upsampled values, unit-major, in a fresh buffer (P = H W)."""
    b, u, h, w = acts.shape
    p = size[0] * size[1]
    a = acts.transpose(0, 1).reshape(u * b, h, w)  # (U b, h, w): the small tensor is the one reordered
    return upsample_rows(a, size).view(u, b * p)
