"""A null for every dissection label, and the border statistic (docs/dissection.md).

A label says that unit u's active region ``a_u > t_u`` overlaps concept c's
masks more than chance. The null asks what IoU the unit would reach if its
activation carried no spatial information WITHIN an image: each image keeps
how much of the map is active, and where, cell by cell, is shuffled. Cells are
the layer's map positions: mask pixel (y, x) belongs to cell
``(y h // Hm, x w // Wm)`` of an h x w map on Hm x Wm masks (b = Hm Wm / (h w)
pixels a cell). Under the null, in each image independently,

1. the cells' active counts ``k_l`` are permuted uniformly over the cells
   (the map's values moved as blocks, as a permutation of its positions would), and
2. inside each cell the active pixels sit uniformly at random.

The intersection with concept c on one image, whose cells hold ``m_j`` concept
pixels, then has (sums over the n cells; ``K1 = sum k``, ``K2 = sum k^2``,
``M1 = sum m``, ``M2 = sum m^2``, ``P = n b``)

    mean  K1 M1 / P
    var   (n K2 - K1^2) (n M2 - M1^2) / (n^2 (n - 1) b^2)     the permutation of cells
          + (b K1 - K2) (b M1 - M2) / (n b^2 (b - 1))         the pixels inside a cell

(the first term is the variance of a linear permutation statistic, the second
the mean of the cells' hypergeometric variances). Images are independent, so
the dataset's intersection I has the sum of these means and variances; the
unit's and the concept's areas (the IoU's other terms) do not move, so
``IoU = I / (A + C - I)`` grows with I and the one-sided p-value of the observed
IoU is that of I: the normal tail with a continuity correction,
``P[I >= I_obs] ~ Phi(-(I_obs - 1/2 - mean) / sd)`` (a sum over hundreds of
images; the formulas are checked against a simulation of the two steps in
``tests/test_dissection_null.py``). ``iou_null`` is the IoU at the null's mean
intersection. A unit active on every pixel of the images it fires on has
variance 0 and p = 1: it says nothing about where the concept is.

Exactness: the per-image sums are integers counted in :func:`analysis.dissection.iou_pass`
(``image_unit`` and ``image_concept`` rows, concatenated over shards in image order);
the per-image mean and variance are elementwise float64 of those integers, and
the dataset sums are :func:`math.fsum` (correctly rounded, so any shard split or
order gives the same bits).

Border statistic: the share of the unit's active pixels on the map's outer ring
of cells, beside the ring's share of all pixels (what a unit placed anywhere
would get). A unit is flagged ``positional`` when its share is at least halfway
from the ring's share to 1: such a unit marks where in the frame, not what.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from analysis.stats import bh_qvalues

__all__ = ["cell_index", "image_null", "label_nulls", "ring_cells"]


def cell_index(mask_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """((Hm Wm,) int64 the cell of every mask pixel, row-major; the number of cells n).

    A map larger than the masks (on an axis) is counted at the masks' resolution on that axis."""
    hm, wm = mask_size
    h, w = min(map_size[0], hm), min(map_size[1], wm)
    rows = torch.arange(hm) * h // hm
    cols = torch.arange(wm) * w // wm
    return (rows[:, None] * w + cols[None, :]).reshape(-1), h * w


def ring_cells(mask_size: tuple[int, int], map_size: tuple[int, int]) -> torch.Tensor:
    """(n,) bool: the cells on the map's outer ring (all of them when the map is under 3 cells on a side)."""
    h, w = min(map_size[0], mask_size[0]), min(map_size[1], mask_size[1])
    ring = torch.ones(h, w, dtype=torch.bool)
    if h >= 3 and w >= 3:
        ring[1:-1, 1:-1] = False
    return ring.reshape(-1)


def image_null(k1, k2, m1, m2, *, cells: int, pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the null's mean and variance of the intersection (module docstring), float64 arrays.

    ``k1, k2``: the unit's active pixels and the sum of its cells' squared counts; ``m1, m2``: the same of
    the concept's pixels; ``cells`` n and ``pixels`` P per image."""
    k1, k2, m1, m2 = (np.asarray(v, dtype=np.float64) for v in (k1, k2, m1, m2))
    n, b = float(cells), pixels / cells
    mean = k1 * m1 / pixels
    shuffle = np.zeros_like(mean) if n < 2 else (n * k2 - k1 * k1) * (n * m2 - m1 * m1) / (n * n * (n - 1) * b * b)
    scatter = np.zeros_like(mean) if b <= 1 else (b * k1 - k2) * (b * m1 - m2) / (n * b * b * (b - 1))
    return mean, shuffle + scatter


def _groups(table: torch.Tensor, column: int, size: int) -> list[np.ndarray]:
    """The rows of ``table`` split by the value (0..size-1) in ``column``, each group in table order."""
    t = table.numpy()
    order = np.argsort(t[:, column], kind="stable")
    bounds = np.cumsum(np.bincount(t[:, column], minlength=size))[:size]
    return np.split(t[order], bounds[:-1])


def label_nulls(counts, best: torch.Tensor) -> pd.DataFrame:
    """Per unit, for its label ``best[u]``: iou_null, p_value, q_value (BH over the units), border_share,
    border_expected, positional. ``counts`` is an :class:`analysis.dissection.ConceptCounts`; without its
    image-level rows (``image_unit``, ``image_concept``: counts built by hand) every column is NaN / False."""
    U = best.numel()
    if counts.image_unit is None or counts.image_concept is None or counts.ring_area is None:
        nan = np.full(U, np.nan)
        return pd.DataFrame({"iou_null": nan, "p_value": nan, "q_value": nan, "border_share": nan,
                             "border_expected": nan, "positional": np.zeros(U, dtype=bool)})
    inter = counts.intersection.gather(1, best[:, None])[:, 0]
    denom = counts.denominator_area.gather(1, best[:, None])[:, 0]
    concept = counts.concept_area[best].double()
    n, pixels = counts.cells, counts.pixels_per_image
    iou_null, p = np.zeros(U), np.ones(U)
    by_unit = _groups(counts.image_unit, 1, U)  # rows (image, unit, K1, K2)
    by_concept = _groups(counts.image_concept, 1, counts.intersection.shape[1] + 1)  # (image, concept id, M1, M2)
    for u in range(U):
        pairs, masks = by_unit[u], by_concept[int(best[u]) + 1]
        _, a, c = np.intersect1d(pairs[:, 0], masks[:, 0], assume_unique=True, return_indices=True)
        mean_i, var_i = image_null(pairs[a, 2], pairs[a, 3], masks[c, 2], masks[c, 3], cells=n, pixels=pixels)
        mean, var = math.fsum(mean_i.tolist()), math.fsum(var_i.tolist())
        union = float(denom[u]) + float(concept[u]) - mean
        iou_null[u] = mean / union if union > 0 else 0.0
        observed = float(inter[u])
        if var > 0:
            p[u] = 0.5 * math.erfc((observed - 0.5 - mean) / math.sqrt(2 * var))
        else:  # no spread: the observed intersection is the only one the null allows
            p[u] = 1.0 if observed <= mean + 0.5 else 0.0
    area = counts.unit_area.double()
    share = torch.where(area > 0, counts.ring_area.double() / area.clamp_min(1), float("nan")).numpy()
    expected = counts.ring_share
    positional = (share >= (1 + expected) / 2) if expected < 1 else np.zeros(U, dtype=bool)
    return pd.DataFrame({"iou_null": iou_null, "p_value": np.minimum(p, 1.0), "q_value": bh_qvalues(p),
                         "border_share": share, "border_expected": expected,
                         "positional": np.nan_to_num(positional, nan=False).astype(bool)})
