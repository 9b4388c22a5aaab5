"""Network dissection: label each unit of a layer with the concept its top activations overlap best.

Paper: PAPER.md section 1 (Kim, Samith, Utama section 2; Bau et al. 2017,
"Network Dissection", and NetDissect-Lite). For unit u and image x, ``a_u(x, p)``
is the unit's activation (a conv name means after its ReLU, see
:func:`analysis.hooks.unit_layer`) upsampled bilinearly to the concept-mask
resolution (:mod:`analysis.upsample`).

Pass 1, thresholds (:mod:`analysis.thresholds`): ``t_u`` with ``P[a_u > t_u] = q``
over all images and positions, computed EXACTLY, by keeping each unit's top
values (``top_k``) or by a two-level radix histogram of the values' bit
patterns (``histogram``, bounded memory at any dataset size); both merge over
data shards and give the same thresholds.

Pass 2, IoU (:func:`iou_pass` -> :class:`ConceptCounts`): per unit x concept,
integer counts summed over the whole dataset (not per-image means):
intersection ``sum [a_u > t_u and s_c]``, unit area ``sum [a_u > t_u]`` and
concept area ``sum s_c``; ``IoU = inter / (unit_area + concept_area - inter)``.
Counts add over shards (``a + b``).

Concept masks arrive as label maps: each batch is ``(images, labels)`` with
labels (B, L, Hm, Wm) int64, every pixel a global concept id in 1..K (0 =
none); L layers let several masks overlap (shapes: one layer per category;
Broden: one per mask file, image-level labels fill a whole layer). Concept c is
present at a pixel when any layer holds c. :class:`~analysis.concepts.ConceptSet`
names the ids (the concept data: :mod:`analysis.concepts`).

Speed: pass 1 can keep the layer's activations at their own (small) resolution
(``keep_acts=True``) and pass 2 reuse them (``acts=``), so the network runs once
per image; the forward pass stops at the dissected layer. Pass 2 upsamples only
the (image, unit) pairs whose map peak can exceed ``t_u``
(:func:`analysis.activations.peak_bound`; a tenth of them in
``benchmarks/dissection.py``, most of them for units that respond to every image
alike): the others have no active position. It counts from the active positions
themselves (integer adds), so the cost follows q, not the number of concepts.

Concept labels (:func:`label_units`): each unit's best concept by IoU and its
category, with a null (:mod:`analysis.nulls`: the IoU without spatial
information within an image, a p-value, BH q over the units) and the border
statistic; a detector when IoU >= ``iou_threshold`` (paper 0.04) and q < 0.05.
Pass 2 also counts, per (image, unit) and per (image, concept), the integer
cell sums that null needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from analysis.activations import batch_acts, image_chunks, layer_acts, on_device, pair_values, peak_bound
from analysis.concepts import ConceptSet
from analysis.hooks import eval_mode
from analysis.nulls import cell_index, label_nulls, ring_cells
from analysis.thresholds import (
    ThresholdHistogram,
    TopActivations,
    histogram_pass,
    histogram_thresholds,
    threshold_bins,
    threshold_pass,
    top_k_for,
)
from trainables.errors import ConfigError, DataError

__all__ = [
    "ConceptCounts",
    "Dissection",
    "ThresholdHistogram",
    "TopActivations",
    "dissect_layer",
    "histogram_pass",
    "histogram_thresholds",
    "iou_pass",
    "label_units",
    "layer_acts",
    "threshold_pass",
    "top_k_for",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- results


@dataclass
class ConceptCounts:
    """Pass 2: per unit x concept counts over some images; shards add up.

    Attributes:
        layer: the unit layer.
        thresholds: (U,) the ``t_u`` used.
        intersection: (U, K) int64 positions with ``a_u > t_u`` and concept c.
        unit_area: (U,) int64 positions with ``a_u > t_u``.
        concept_area: (K,) int64 positions with concept c.
        positions: all positions counted (images x mask pixels).
        category_area: (U, G) int64 or None: NetDissect-Lite's per-category denominator,
            the unit's active positions on the images where some concept of category g
            lies inside them (:func:`iou_pass` with ``concept_category``).
        concept_category: (K,) int64 or None: each concept's category index in 0..G-1.
        images: images counted (all with one mask size).
        image_unit: (R, 4) int64 rows (image, unit, K1, K2) for every pair with an active pixel: its
            active pixels and the sum of its map cells' squared active counts (:mod:`analysis.nulls`);
            images numbered from 0 in the order counted (shards concatenate).
        image_concept: (S, 4) int64 rows (image, concept id 1..K, M1, M2): the same of each concept present.
        ring_area: (U,) int64 active pixels on the map's outer ring of cells.
        cells: map cells n the masks are divided into; ring_pixels: mask pixels of one image on the ring.
    """

    layer: str
    thresholds: torch.Tensor
    intersection: torch.Tensor
    unit_area: torch.Tensor
    concept_area: torch.Tensor
    positions: int
    category_area: torch.Tensor | None = None
    concept_category: torch.Tensor | None = None
    images: int = 0
    image_unit: torch.Tensor | None = None
    image_concept: torch.Tensor | None = None
    ring_area: torch.Tensor | None = None
    cells: int = 0
    ring_pixels: int = 0

    @property
    def pixels_per_image(self) -> int:
        return self.positions // self.images if self.images else 0

    @property
    def ring_share(self) -> float:
        """The outer ring's share of an image's mask pixels (where a unit placed anywhere has this share)."""
        return self.ring_pixels / self.pixels_per_image if self.pixels_per_image else float("nan")

    def __add__(self, other: ConceptCounts) -> ConceptCounts:
        if self.layer != other.layer or self.intersection.shape != other.intersection.shape:
            raise ConfigError("cannot merge concept counts of different layers or concept sets")
        if not torch.equal(self.thresholds, other.thresholds):
            raise ConfigError("cannot merge concept counts computed with different thresholds")
        if (self.category_area is None) != (other.category_area is None):
            raise ConfigError("cannot merge concept counts with and without per-category unit areas")
        if (self.cells, self.ring_pixels) != (other.cells, other.ring_pixels) and self.images and other.images:
            raise ConfigError("cannot merge concept counts of maps with different cells or mask sizes")
        cat = None if self.category_area is None else self.category_area + other.category_area
        shift = torch.tensor([self.images, 0, 0, 0])  # the other's images come after this one's
        null = self.ring_area is not None and other.ring_area is not None
        return ConceptCounts(self.layer, self.thresholds, self.intersection + other.intersection,
                             self.unit_area + other.unit_area, self.concept_area + other.concept_area,
                             self.positions + other.positions, cat, self.concept_category,
                             self.images + other.images,
                             torch.cat([self.image_unit, other.image_unit + shift]) if null else None,
                             torch.cat([self.image_concept, other.image_concept + shift]) if null else None,
                             self.ring_area + other.ring_area if null else None, self.cells or other.cells,
                             self.ring_pixels or other.ring_pixels)

    @property
    def denominator_area(self) -> torch.Tensor:
        """(U, K) float64 the unit's area each concept's IoU divides by: its whole active area, or (per
        category) its area on the images where that concept's category lies inside it."""
        if self.category_area is None:
            return self.unit_area.double()[:, None].expand(-1, self.intersection.shape[1])
        return self.category_area.double()[:, self.concept_category]

    @property
    def iou_ceiling(self) -> torch.Tensor:
        """(U, K) the largest IoU unit u could reach with concept c given the two areas alone.

        ``min(A_u, C_c) / max(A_u, C_c)`` with A_u the unit's area and C_c the concept's
        (IoU is at most the smaller over the larger); with A_u = q N this is the
        ``min(q, share) / max(q, share)`` of a concept covering ``share`` of all positions.
        """
        a = self.denominator_area
        c = self.concept_area.double()[None, :]
        big = torch.maximum(a, c)
        return torch.where(big > 0, torch.minimum(a, c) / big.clamp_min(1), 0.0)

    @property
    def iou(self) -> torch.Tensor:
        """(U, K) float64 ``inter / (unit_area + concept_area - inter)``; 0 where the union is empty."""
        inter = self.intersection.double()
        union = self.denominator_area + self.concept_area.double()[None, :] - inter
        return torch.where(union > 0, inter / union.clamp_min(1), 0.0)

    def state_dict(self) -> dict:
        return {"layer": self.layer, "thresholds": self.thresholds, "intersection": self.intersection,
                "unit_area": self.unit_area, "concept_area": self.concept_area, "positions": self.positions,
                "category_area": self.category_area, "concept_category": self.concept_category,
                "images": self.images, "image_unit": self.image_unit, "image_concept": self.image_concept,
                "ring_area": self.ring_area, "cells": self.cells, "ring_pixels": self.ring_pixels}

    @classmethod
    def from_state_dict(cls, d: dict) -> ConceptCounts:
        return cls(d["layer"], d["thresholds"], d["intersection"], d["unit_area"], d["concept_area"],
                   int(d["positions"]), d.get("category_area"), d.get("concept_category"), int(d["images"]),
                   d["image_unit"], d["image_concept"], d["ring_area"], int(d["cells"]), int(d["ring_pixels"]))


def iou_pass(
    model: nn.Module | None,
    layer: str,
    batches: Batches,
    thresholds: torch.Tensor,
    *,
    num_concepts: int,
    device: str | torch.device,
    acts: Sequence[torch.Tensor] | None = None,
    concept_category: torch.Tensor | None = None,
    null: bool = True,
) -> ConceptCounts:
    """Pass 2 over ``batches`` (a data shard): intersection, unit and concept areas per unit x concept.

    ``null``: also count the per-image cell sums of the labels' null and the border statistic
    (:mod:`analysis.nulls`; ``False`` only to measure what they cost, ``benchmarks/dissection.py``).

    ``acts`` (from ``threshold_pass(..., keep_acts=True)`` on the same batches)
    skips the model. Concept ids above ``num_concepts`` are an error.
    ``concept_category`` ((K,) category index per concept) also counts NetDissect-Lite's
    per-category unit areas (:attr:`ConceptCounts.category_area`): on each image, the
    unit's active area counts for category g when some concept of g lies inside it.
    """
    K = num_concepts
    work = on_device(model, device) if model is not None else None
    t = thresholds.to(device).float()
    U = t.numel()
    per_category = concept_category is not None
    if per_category:
        G = int(concept_category.max()) + 1 if concept_category.numel() else 0
        # each concept id's category; id 0 (no concept) goes to an extra column G
        cat_of = torch.cat([torch.full((1,), G, dtype=torch.long), concept_category.long().cpu()]).to(device)
        category_area = torch.zeros(U, G, dtype=torch.long, device=device)
    inter = torch.zeros(U * (K + 1), dtype=torch.long, device=device)  # (U, K + 1) flat; column 0: no concept
    unit_area = torch.zeros(U, dtype=torch.long, device=device)
    concept_area = torch.zeros(K + 1, dtype=torch.long, device=device)
    ring_area = torch.zeros(U, dtype=torch.long, device=device)
    positions = images = cells = ring_pixels = 0
    image_unit, image_concept = [], []
    ctx = eval_mode(work) if work is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for a, labels in batch_acts(work, layer, batches, acts, device):
            if a.shape[1] != U:
                raise ConfigError(f"{U} thresholds for a layer with {a.shape[1]} units")
            if int(labels.max()) > K or int(labels.min()) < 0:
                raise DataError(f"label maps hold concept ids outside 0..{K}")
            size = tuple(labels.shape[-2:])
            b, L, p = labels.shape[0], labels.shape[1], size[0] * size[1]
            cell, cells = cell_index(size, tuple(a.shape[-2:]))
            cell, ring = cell.to(device), ring_cells(size, tuple(a.shape[-2:])).to(device)
            ring_pixels = int(ring[cell].sum())
            ids = _once_per_pixel(labels.reshape(b, L, p))  # (b, L, P)
            concept_area += torch.bincount(ids.reshape(-1), minlength=K + 1)
            if null:
                image_concept.append(_cell_sums(ids, cell, cells, K, images))
            # only pairs whose values can exceed t_u have any active position
            image, unit = (peak_bound(a.flatten(2).amax(2)) > t[None]).nonzero(as_tuple=True)
            # a chunk's active positions hold 2 + L int64 indices each in the worst case: bound that, too
            for lo, hi in image_chunks(image.numel(), p * (2 + L)):
                i, u = image[lo:hi], unit[lo:hi]
                on = pair_values(a, i, u, size) > t[u, None]  # (n, P) [a_u > t_u]
                area = on.sum(1)
                unit_area.index_add_(0, u, area)
                if null:
                    per_cell = _per_cell(on, size, tuple(a.shape[-2:]), cell, cells)
                    ring_area.index_add_(0, u, per_cell[:, ring].sum(1))
                    live = area > 0
                    image_unit.append(torch.stack([i + images, u, area, per_cell.square().sum(1)], 1)[live].cpu())
                row, pixel = on.nonzero(as_tuple=True)
                hit = ids[i[row], :, pixel]  # (m, L) the concepts at each active position
                inter.index_add_(0, (u[row, None] * (K + 1) + hit).view(-1),
                                 torch.ones(1, dtype=torch.long, device=device).expand(hit.numel()))
                if per_category:  # the pair's area counts for each category it overlaps
                    overlaps = torch.zeros(hi - lo, G + 1, dtype=torch.long, device=device)
                    overlaps[row[:, None].expand(-1, L), cat_of[hit]] = 1
                    category_area.index_add_(0, u, area[:, None] * overlaps[:, :G])
            positions, images = positions + b * p, images + b
    inter = inter.view(U, K + 1)
    empty = torch.zeros(0, 4, dtype=torch.long)
    return ConceptCounts(layer, thresholds.cpu().float(), inter[:, 1:].cpu(), unit_area.cpu(),
                         concept_area[1:].cpu(), positions, category_area.cpu() if per_category else None,
                         concept_category.long().cpu() if per_category else None, images,
                         torch.cat([empty, *image_unit]) if null else None,
                         torch.cat([empty, *image_concept]) if null else None, ring_area.cpu() if null else None,
                         cells, ring_pixels)


def _per_cell(on: torch.Tensor, size: tuple[int, int], map_size: tuple[int, int], cell: torch.Tensor,
              cells: int) -> torch.Tensor:
    """(n, cells) int64 active pixels of each row of ``on`` ((n, H W) bool) in each map cell: a reshape where
    the cells tile the masks evenly, else an index_add by ``cell`` (the same integers)."""
    (hm, wm), h, w = size, min(map_size[0], size[0]), min(map_size[1], size[1])
    if hm % h == 0 and wm % w == 0:
        return on.view(-1, h, hm // h, w, wm // w).sum((2, 4), dtype=torch.long).view(-1, cells)
    return torch.zeros(on.shape[0], cells, dtype=torch.long, device=on.device).index_add_(1, cell, on.long())


def _cell_sums(ids: torch.Tensor, cell: torch.Tensor, cells: int, K: int, first: int) -> torch.Tensor:
    """(S, 4) rows (image, concept id, M1, M2) of the concepts present in each image of the batch ``ids``
    ((b, L, P) concept ids once per pixel): their pixels and the sum of their cells' squared pixel counts."""
    b = ids.shape[0]
    key = (torch.arange(b, device=ids.device)[:, None, None] * (K + 1) + ids) * cells + cell
    per_cell = torch.bincount(key.reshape(-1), minlength=b * (K + 1) * cells).view(b, K + 1, cells)
    m1, m2 = per_cell.sum(2), per_cell.square().sum(2)
    image, concept = (m1[:, 1:] > 0).nonzero(as_tuple=True)
    concept = concept + 1
    return torch.stack([image + first, concept, m1[image, concept], m2[image, concept]], 1).cpu()


def _once_per_pixel(labels: torch.Tensor) -> torch.Tensor:
    """(b, L, P) label layers with a concept held by several layers at one pixel kept once (the others 0)."""
    if labels.shape[1] == 1:
        return labels
    ids = labels.sort(1).values
    ids[:, 1:][ids[:, 1:] == ids[:, :-1]] = 0
    return ids


# --------------------------------------------------------------------------- labels


def label_units(counts: ConceptCounts, concepts: ConceptSet, iou_threshold: float = 0.04,
                alpha: float = 0.05) -> pd.DataFrame:
    """One row per unit: unit, label (best concept), category, iou, threshold, the label's null
    (:func:`analysis.nulls.label_nulls`: iou_null, p_value, q_value), detector, concept_share (the label's
    share of all positions), ceiling (the label's :attr:`ConceptCounts.iou_ceiling`), iou_to_ceiling (iou /
    ceiling: near 1 means the areas, not the unit, bound the IoU), and the border statistic (border_share,
    border_expected, positional).

    A detector has IoU >= ``iou_threshold`` AND beats its null: q_value < ``alpha`` (Benjamini-Hochberg over
    the units). Ties between concepts go to the lower id. A unit that never fires gets IoU 0, p = 1 and the
    first concept; it is never a detector.
    """
    if counts.intersection.shape[1] != len(concepts):
        raise ConfigError(f"counts for {counts.intersection.shape[1]} concepts but {len(concepts)} concept names")
    iou = counts.iou
    best_iou, best = iou.max(1)
    ceiling = counts.iou_ceiling.gather(1, best[:, None])[:, 0]
    share = counts.concept_area.double()[best] / max(counts.positions, 1)
    null = label_nulls(counts, best)
    table = pd.DataFrame({
        "unit": range(iou.shape[0]),
        "label": [concepts.names[i] for i in best.tolist()],
        "category": [concepts.categories[i] for i in best.tolist()],
        "iou": best_iou.numpy(),
        "threshold": counts.thresholds.double().numpy(),
        "iou_null": null["iou_null"],
        "p_value": null["p_value"],
        "q_value": null["q_value"],
        "detector": (best_iou.numpy() >= iou_threshold) & (null["q_value"].to_numpy() < alpha),
        "concept_share": share.numpy(),
        "ceiling": ceiling.numpy(),
        "iou_to_ceiling": torch.where(ceiling > 0, best_iou / ceiling.clamp_min(1e-12), 0.0).numpy(),
    })
    return pd.concat([table, null[["border_share", "border_expected", "positional"]]], axis=1)


@dataclass
class Dissection:
    """What :func:`dissect_layer` found: the merged passes and the per-unit table."""

    top: TopActivations | ThresholdHistogram  # pass 1 (its image_max ranks Figure 3's images)
    counts: ConceptCounts
    units: pd.DataFrame  # label_units(counts, concepts, iou_threshold)


def dissect_layer(
    model: nn.Module,
    layer: str,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    concepts: ConceptSet,
    *,
    device: str | torch.device,
    quantile: float = 0.01,
    iou_threshold: float = 0.04,
    method: str = "top_k",
    null: bool = True,
) -> Dissection:
    """Both passes in one process (the network runs once per image); ``batches`` is re-iterable.

    ``method``: ``top_k`` or ``histogram`` thresholds (:mod:`analysis.thresholds`; the same values);
    ``null``: :func:`iou_pass`'s (without it, no label has a null and none is a detector)."""
    if method == "top_k":
        total = sum(lbl.shape[0] * lbl.shape[-2] * lbl.shape[-1] for _, lbl in batches)
        top, acts = threshold_pass(model, layer, batches, quantile=quantile, total_positions=total, device=device,
                                   keep_acts=True)
        t = top.thresholds(quantile)
    elif method == "histogram":
        top, acts = histogram_pass(model, layer, batches, device=device, keep_acts=True)
        prefix, _ = threshold_bins(top, quantile)
        fine = histogram_pass(None, layer, batches, device=device, prefix=prefix, acts=acts)
        t = histogram_thresholds(top, fine, quantile)
    else:
        raise ConfigError(f"threshold method {method!r}; use 'top_k' or 'histogram'")
    counts = iou_pass(None, layer, batches, t, num_concepts=len(concepts), device=device, acts=acts, null=null)
    return Dissection(top, counts, label_units(counts, concepts, iou_threshold))
