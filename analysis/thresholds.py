"""Dissection pass 1: each unit's activation threshold ``t_u`` with ``P[a_u > t_u] = q``, exactly.

With N positions in the whole dataset (images x positions), ``k = floor(q N)``;
``t_u`` is the (k+1)-th largest value of unit u, so exactly k positions lie
strictly above it when values are distinct (the share above ``t_u`` is
``floor(qN)/N``, within ``1/N`` of q; ties at ``t_u`` only lower it). The values
are the layer's maps upsampled to the masks (``on="upsampled"``) or its own
maps (``"raw"``, as NetDissect-Lite takes its quantile). Two exact methods,
both mergeable over data shards (``a + b``), give the same ``t_u``:

* ``top_k`` (:func:`threshold_pass` -> :class:`TopActivations`): each shard keeps
  its own top ``k+1`` values per unit (k from the *global* N, which the caller
  passes as ``total_positions``); the union's top ``k+1`` is the whole dataset's.
  Memory ``U x (k+1)`` float32 per shard: 10 MiB for 500 shapes images at 32x32
  (q = 0.01, 512 units), but 8 GiB for full Broden upsampled to 112x112 at q = 0.005.
* ``histogram`` (:func:`histogram_pass` -> :class:`ThresholdHistogram`, then
  :func:`histogram_thresholds`): a radix selection on the float32 bit patterns.
  Each value maps to a 32-bit key in the same order (:func:`float_keys`). The
  first pass counts, per unit, the keys' high 16 bits (65,536 bins); the merged
  counts name the bin that holds the (k+1)-th largest key and its rank inside
  that bin. The second pass counts the low 16 bits of the keys in that one bin
  only, which pins the key exactly. Memory ``U x 65,536`` int64 per task,
  whatever N is: 256 MiB for 512 units. Costs one more pass over the data.

Both also record each image's peak per unit (``image_max``: the largest value
of the unit's own feature map, by which NetDissect-Lite ranks a unit's top
images), which ranks Figure 3's images.

Pruning: both upsample only the (image, unit) pairs that can matter. A pair's
upsampled values never exceed its map's peak (:func:`analysis.activations.peak_bound`),
so ``top_k`` skips pairs whose bound is at most the unit's running k-th value,
and level 2 of ``histogram`` skips pairs whose bound lies below the unit's bin.
The results are those of upsampling every pair, to the bit (tested).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from analysis.activations import (
    CHUNK_ELEMENTS,
    batch_acts,
    image_chunks,
    on_device,
    pair_values,
    peak_bound,
)
from analysis.hooks import eval_mode
from analysis.upsample import upsample_unit_major
from trainables.errors import ConfigError, DataError

__all__ = [
    "BINS",
    "ThresholdHistogram",
    "TopActivations",
    "float_keys",
    "histogram_bytes",
    "histogram_pass",
    "histogram_thresholds",
    "keys_to_float",
    "rank_bins",
    "threshold_bins",
    "threshold_pass",
    "top_k_bytes",
    "top_k_for",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
BINS = 1 << 16  # bins per unit in each radix pass: 16 of the key's 32 bits
# Activations (own resolution) the top_k pass prunes together: 128 MiB float32. Pairs are taken in
# descending peak order within a group, so a larger group prunes more.
GROUP_ELEMENTS = 2**25


# --------------------------------------------------------------------------- results


@dataclass
class TopActivations:
    """Pass 1 (``top_k``): each unit's largest values over some images; shards add up.

    Attributes:
        layer: the unit layer.
        values: (U, k) float32, each row sorted descending (k = :func:`top_k_for`).
        positions: positions seen (images x positions).
        image_max: (n, U) each image's peak per unit (the largest value of its own feature map), images in order
            (concatenated by ``+``: add shards in data order). Ranks Figure 3's images.
    """

    layer: str
    values: torch.Tensor
    positions: int
    image_max: torch.Tensor

    def __add__(self, other: TopActivations) -> TopActivations:
        if self.layer != other.layer or self.values.shape[0] != other.values.shape[0]:
            raise ConfigError("cannot merge top activations of different layers")
        k = max(self.values.shape[1], other.values.shape[1])
        both = torch.cat([self.values, other.values], 1)
        values = both.topk(min(k, both.shape[1]), dim=1).values
        return TopActivations(self.layer, values, self.positions + other.positions,
                              torch.cat([self.image_max, other.image_max]))

    def thresholds(self, quantile: float) -> torch.Tensor:
        """(U,) ``t_u``: the (floor(q N) + 1)-th largest value, N = all positions seen."""
        k = math.floor(quantile * self.positions)
        if self.values.shape[1] <= k:
            raise ConfigError(
                f"kept {self.values.shape[1]} top values per unit but quantile {quantile} of {self.positions} "
                f"positions needs {k + 1}: pass the whole dataset's total_positions to every shard"
            )
        return self.values[:, k].clone()

    def state_dict(self) -> dict:
        return {"layer": self.layer, "values": self.values, "positions": self.positions, "image_max": self.image_max}

    @classmethod
    def from_state_dict(cls, d: dict) -> TopActivations:
        return cls(d["layer"], d["values"], int(d["positions"]), d["image_max"])


@dataclass
class ThresholdHistogram:
    """Pass 1 (``histogram``): per unit, counts of the values' keys in :data:`BINS` bins; shards add up.

    Attributes:
        layer: the unit layer.
        counts: (U, BINS) int64. Level 1 (``prefix`` None): keys counted by their high 16 bits.
            Level 2: only the keys whose high bits are ``prefix[u]``, counted by their low 16 bits.
        positions: positions seen (images x positions), all of them, at both levels.
        image_max: (n, U) each image's peak per unit (its own feature map's largest value), images in
            order (``+`` concatenates).
        prefix: (U,) int64 high-bit bin each unit's level-2 counts are restricted to, or None.
    """

    layer: str
    counts: torch.Tensor
    positions: int
    image_max: torch.Tensor
    prefix: torch.Tensor | None = None

    def __add__(self, other: ThresholdHistogram) -> ThresholdHistogram:
        if self.layer != other.layer or self.counts.shape != other.counts.shape:
            raise ConfigError("cannot merge threshold histograms of different layers")
        if (self.prefix is None) != (other.prefix is None) or (
                self.prefix is not None and not torch.equal(self.prefix, other.prefix)):
            raise ConfigError("cannot merge threshold histograms of different radix passes")
        return ThresholdHistogram(self.layer, self.counts + other.counts, self.positions + other.positions,
                                  torch.cat([self.image_max, other.image_max]), self.prefix)

    def state_dict(self) -> dict:
        """Only the non-empty bins are stored (most of a unit's 65,536 are empty), as flat indices and counts."""
        flat = self.counts.reshape(-1)
        where = flat.nonzero()[:, 0]
        return {"layer": self.layer, "units": self.counts.shape[0], "bins": where, "counts": flat[where],
                "positions": self.positions, "image_max": self.image_max, "prefix": self.prefix}

    @classmethod
    def from_state_dict(cls, d: dict) -> ThresholdHistogram:
        counts = torch.zeros(int(d["units"]) * BINS, dtype=torch.long)
        counts[d["bins"]] = d["counts"]
        return cls(d["layer"], counts.view(-1, BINS), int(d["positions"]), d["image_max"], d.get("prefix"))


# --------------------------------------------------------------------------- keys and ranks


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys in the order of the float32 values: ``a < b`` exactly when ``key(a) < key(b)``.

    Non-negative floats keep their bit pattern; negative ones flip their 31 magnitude
    bits, so larger magnitudes sort lower (-0.0 maps to -1, just below +0.0).
    """
    bits = x.float().contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def keys_to_float(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """float32 values of the keys whose high 16 bits (as bins 0..65535) are ``high`` and low bits ``low``."""
    key = ((high.long() - BINS // 2) << 16) | low.long()
    bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key).to(torch.int32)
    return bits.view(torch.float32).clone()


def rank_bins(counts: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``counts`` (U, B): the bin holding the ``rank``-th largest element (0-based from the
    top) and that element's rank among the bin's own elements, also from the top."""
    from_top = counts.flip(1).cumsum(1)  # [:, j]: elements in the j+1 highest bins
    rank = rank.long().reshape(-1, 1)
    if bool((from_top[:, -1:] <= rank).any()):
        raise DataError("a threshold rank lies beyond the values counted: the passes saw different data")
    j = torch.searchsorted(from_top, rank, right=True)  # first j with from_top > rank
    above = from_top.gather(1, j) - counts.flip(1).gather(1, j)
    return (counts.shape[1] - 1 - j)[:, 0], (rank - above)[:, 0]


def threshold_bins(level1: ThresholdHistogram, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U,) the level-1 bin holding each unit's (floor(q N) + 1)-th largest value, and its rank in that bin:
    the bins are the ``prefix`` of the level-2 pass."""
    if level1.prefix is not None:
        raise ConfigError("threshold_bins needs a level-1 histogram (prefix None)")
    top_k_for(quantile, level1.positions)  # checks q
    return rank_bins(level1.counts, torch.full((level1.counts.shape[0],), math.floor(quantile * level1.positions)))


def histogram_thresholds(level1: ThresholdHistogram, level2: ThresholdHistogram, quantile: float) -> torch.Tensor:
    """(U,) ``t_u`` from the two merged radix passes: the (floor(q N) + 1)-th largest value, exactly."""
    if level2.prefix is None:
        raise ConfigError("histogram_thresholds needs the level-2 histogram of the level-1 one's threshold bins")
    high, within = threshold_bins(level1, quantile)
    if not torch.equal(high, level2.prefix):
        raise ConfigError("the level-2 histogram was counted for other bins than this level-1 histogram names")
    if not torch.equal(level2.counts.sum(1), level1.counts.gather(1, high[:, None])[:, 0]):
        raise DataError("the selection pass counted other values in the threshold bins than the first pass: "
                        "the activations changed between passes (nondeterministic kernels?)")
    low, _ = rank_bins(level2.counts, within)
    return keys_to_float(high, low)


def top_k_for(quantile: float, total_positions: int) -> int:
    """Values kept per unit by the ``top_k`` method: ``floor(q N) + 1``."""
    if not 0 < quantile < 1:
        raise ConfigError(f"quantile must be in (0, 1), got {quantile}")
    return min(total_positions, math.floor(quantile * total_positions) + 1)


def top_k_bytes(quantile: float, total_positions: int, units: int) -> int:
    """Memory of the ``top_k`` method's kept values per task."""
    return 4 * units * top_k_for(quantile, total_positions)


def histogram_bytes(units: int) -> int:
    """Memory of the ``histogram`` method's counts per task (one radix level)."""
    return 8 * units * BINS


# --------------------------------------------------------------------------- passes


def _layer_batches(model, layer, batches, device, on, kept, acts) -> Iterator[tuple[torch.Tensor, tuple, torch.Tensor]]:
    """Per batch: the layer's activations (b, U, h, w), the size the quantile's values have (the masks' when
    ``on`` is ``upsampled``, the map's own when ``raw``) and each map's peak (b, U). Appends the activations
    to ``kept``; ``acts`` (kept by an earlier pass on the same batches) skips the model."""
    if on not in ("upsampled", "raw"):
        raise ConfigError(f"threshold pass on = {on!r}; use 'upsampled' or 'raw'")
    work = on_device(model, device) if acts is None else None
    ctx = eval_mode(work) if work is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for a, labels in batch_acts(work, layer, batches, acts, device):
            if kept is not None:
                kept.append(a.cpu())
            size = tuple(labels.shape[-2:]) if on == "upsampled" else tuple(a.shape[-2:])
            yield a, size, a.flatten(2).amax(2)


def _groups(take: torch.Tensor, positions: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Units with ``take > 0`` grouped by their take rounded up to a power of two (little padding), each
    group cut so that (units x width x positions) stays within :data:`CHUNK_ELEMENTS`; yields (units, width)."""
    take = take.cpu()
    units = (take > 0).nonzero()[:, 0]
    bucket = torch.ceil(torch.log2(take[units].double())).long()
    for j in bucket.unique().tolist():
        group = units[bucket == j]
        width = int(take[group].max())
        rows = max(1, CHUNK_ELEMENTS // (width * positions))
        for lo in range(0, group.numel(), rows):
            yield group[lo : lo + rows], width


def _merge_top(top: torch.Tensor, a: torch.Tensor, peaks: torch.Tensor, size: tuple) -> torch.Tensor:
    """Each unit's running top values (U, k), unsorted, -inf where fewer than k are held, merged with the
    values of a group of images (activations ``a``, their peaks (b, U)).

    Only the (image, unit) pairs that can change the top are upsampled: a pair whose
    :func:`~analysis.activations.peak_bound` is at most the unit's running k-th value
    holds no larger value, so the top keeps the same values without it. Per unit the
    images are taken in descending peak order, in rounds that double: first enough
    to hold k values, then twice as many each round, while the next image's bound
    still exceeds the (raised) k-th value.
    """
    u, k = top.shape
    b, p = a.shape[0], size[0] * size[1]
    bound, order = peak_bound(peaks).t().sort(1, descending=True)  # (U, b) per unit, highest peak first
    done = torch.zeros(u, dtype=torch.long, device=top.device)  # images taken so far per unit, in that order
    step = -(-k // p)  # images per unit in the first round: enough to hold k values
    most = max(1, CHUNK_ELEMENTS // p)  # images per unit per round
    while True:
        kth = top.amin(1)  # the k-th largest value held (the top is kept unsorted)
        left = ((bound > kth[:, None]).sum(1) - done).clamp_min(0)
        take = left.clamp(max=min(step, most))
        if not bool((take > 0).any()):
            return top
        for units, width in _groups(take, p):
            units = units.to(top.device)
            cols = done[units, None] + torch.arange(width, device=top.device)  # (n, width) ranks
            image = order[units[:, None], cols.clamp(max=b - 1)]
            vals = pair_values(a, image.reshape(-1), units.repeat_interleave(width), size).view(-1, width, p)
            vals.masked_fill_((cols >= (done + take)[units, None])[..., None], -math.inf)  # padding
            top[units] = torch.cat([top[units], vals.view(units.numel(), -1)], 1).topk(k, 1, sorted=False).values
        done += take
        step *= 2


def threshold_pass(
    model: nn.Module,
    layer: str,
    batches: Batches,
    *,
    quantile: float,
    total_positions: int,
    device: str | torch.device,
    keep_acts: bool = False,
    on: str = "upsampled",
    acts: Sequence[torch.Tensor] | None = None,
) -> TopActivations | tuple[TopActivations, list[torch.Tensor]]:
    """Pass 1 by ``top_k`` over ``batches`` (a data shard): each unit's top ``floor(q N) + 1`` values.

    ``on = "upsampled"``: the values upsampled to the masks (N = images x mask
    pixels); ``"raw"``: the layer's own feature maps, as NetDissect-Lite takes its
    quantile (N = images x map positions: 64x fewer values for a 14x14 map and
    112 px masks). ``total_positions`` is N for the WHOLE dataset, so shards merge
    exactly. With ``keep_acts`` also returns the layer's activations per batch
    (CPU, own resolution) for :func:`analysis.dissection.iou_pass`; ``acts`` such
    activations of the same batches, to skip the model (``model`` may be None).
    Upsamples only the (image, unit) pairs that can reach the top (:func:`_merge_top`).
    """
    k = top_k_for(quantile, total_positions)
    top, seen, maxes, kept = None, 0, [], [] if keep_acts else None
    group, group_size = [], None  # batches pruned together (the larger, the better the pruning), their size

    def merged(top):
        return _merge_top(top, torch.cat([g for g, _ in group]), torch.cat([m for _, m in group]), group_size)

    for a, size, peaks in _layer_batches(model, layer, batches, device, on, kept, acts):
        maxes.append(peaks.cpu())
        seen += a.shape[0] * size[0] * size[1]
        if top is None:
            top = torch.full((a.shape[1], k), -math.inf, device=a.device)
        if group and (group_size != size or sum(g.numel() for g, _ in group) + a.numel() > GROUP_ELEMENTS):
            top, group = merged(top), []
        group.append((a, peaks))
        group_size = size
    if group:
        top = merged(top)
    if top is None:
        raise DataError("threshold_pass got no images")
    result = TopActivations(layer, top.sort(1, descending=True).values[:, : min(k, seen)].cpu(), seen,
                            torch.cat(maxes))
    return (result, kept) if keep_acts else result


def histogram_pass(
    model: nn.Module,
    layer: str,
    batches: Batches,
    *,
    device: str | torch.device,
    prefix: torch.Tensor | None = None,
    keep_acts: bool = False,
    on: str = "upsampled",
    acts: Sequence[torch.Tensor] | None = None,
) -> ThresholdHistogram | tuple[ThresholdHistogram, list[torch.Tensor]]:
    """Pass 1 by ``histogram`` over ``batches`` (a data shard): one radix level's counts per unit.

    ``prefix`` None: level 1, every value counted by its key's high 16 bits. ``prefix``
    (U,) from :func:`rank_bins` on the merged level 1: level 2, only the values in
    bin ``prefix[u]``, counted by their low 16 bits; it upsamples only the (image,
    unit) pairs whose peak bound reaches the bin's lowest value. ``on`` and
    ``keep_acts`` as in :func:`threshold_pass`, and so is ``acts``. Needs no total:
    N is the positions seen, merged.
    """
    counts, seen, maxes, kept = None, 0, [], [] if keep_acts else None
    for a, size, peaks in _layer_batches(model, layer, batches, device, on, kept, acts):
        b, u = peaks.shape
        p = size[0] * size[1]
        if counts is None:
            counts = torch.zeros(u * BINS, dtype=torch.long, device=a.device)
            if prefix is not None:
                prefix_on = prefix.to(a.device).long()
                lowest = keys_to_float(prefix_on, torch.zeros_like(prefix_on))  # each unit's bin's lowest value
        maxes.append(peaks.cpu())
        seen += b * p
        if prefix is None:  # every value: unit-major chunks
            offset = torch.arange(u, device=a.device)[:, None] * BINS
            for lo, hi in image_chunks(b, u * p):
                flat = upsample_unit_major(a[lo:hi], size)  # the map itself when size is its own
                idx = (((float_keys(flat) >> 16).long() + BINS // 2) + offset).view(-1)
                counts.index_add_(0, idx, torch.ones(1, dtype=torch.long, device=a.device).expand(idx.numel()))
            continue
        image, unit = (peak_bound(peaks) >= lowest[None]).nonzero(as_tuple=True)
        for lo, hi in image_chunks(image.numel(), p):
            keys = float_keys(pair_values(a, image[lo:hi], unit[lo:hi], size))  # (n, P)
            inside = ((keys >> 16).long() + BINS // 2) == prefix_on[unit[lo:hi], None]
            idx = ((keys & 0xFFFF).long() + unit[lo:hi, None] * BINS)[inside]
            counts.index_add_(0, idx, torch.ones(1, dtype=torch.long, device=a.device).expand(idx.numel()))
    if counts is None:
        raise DataError("histogram_pass got no images")
    result = ThresholdHistogram(layer, counts.view(-1, BINS).cpu(), seen, torch.cat(maxes),
                                None if prefix is None else prefix.long().cpu())
    return (result, kept) if keep_acts else result
