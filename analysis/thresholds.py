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

Both also record each image's largest value per unit (``image_max``), which
ranks Figure 3's images.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from analysis.activations import batch_acts, image_chunks, on_device
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


# --------------------------------------------------------------------------- results


@dataclass
class TopActivations:
    """Pass 1 (``top_k``): each unit's largest values over some images; shards add up.

    Attributes:
        layer: the unit layer.
        values: (U, k) float32, each row sorted descending (k = :func:`top_k_for`).
        positions: positions seen (images x positions).
        image_max: (n, U) each image's largest upsampled activation per unit, images in order
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
        image_max: (n, U) each image's largest value per unit, images in order (``+`` concatenates).
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


def _unit_values(model, layer, batches, device, on, kept, acts) -> Iterator[tuple[torch.Tensor, int]]:
    """(U, b P) unit-major chunks of the values the quantile is taken over, with their b images; appends
    the layer's activations to ``kept``; ``acts`` (kept by an earlier pass on the same batches) skips the model."""
    if on not in ("upsampled", "raw"):
        raise ConfigError(f"threshold pass on = {on!r}; use 'upsampled' or 'raw'")
    work = on_device(model, device) if acts is None else None
    ctx = eval_mode(work) if work is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for a, labels in batch_acts(work, layer, batches, acts, device):
            if kept is not None:
                kept.append(a.cpu())
            size = tuple(labels.shape[-2:]) if on == "upsampled" else tuple(a.shape[-2:])
            u, p = a.shape[1], size[0] * size[1]
            for lo, hi in image_chunks(a.shape[0], u * p):
                yield (upsample_unit_major(a[lo:hi], size) if on == "upsampled"
                       else a[lo:hi].transpose(0, 1).reshape(u, -1)), hi - lo


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
    """
    k = top_k_for(quantile, total_positions)
    top, seen, maxes, kept = None, 0, [], [] if keep_acts else None
    for flat, b in _unit_values(model, layer, batches, device, on, kept, acts):
        u = flat.shape[0]
        maxes.append(flat.view(u, b, -1).amax(2).t().cpu())
        seen += flat.shape[1]
        flat = flat.topk(min(k, flat.shape[1]), dim=1).values
        if top is not None:
            flat = torch.cat([top, flat], 1)
            flat = flat.topk(min(k, flat.shape[1]), dim=1).values
        top = flat
    if top is None:
        raise DataError("threshold_pass got no images")
    result = TopActivations(layer, top.cpu(), seen, torch.cat(maxes))
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
    bin ``prefix[u]``, counted by their low 16 bits. ``on`` and ``keep_acts`` as in
    :func:`threshold_pass`, and so is ``acts``. Needs no total: N is the positions seen, merged.
    """
    counts, seen, maxes, kept = None, 0, [], [] if keep_acts else None
    for flat, b in _unit_values(model, layer, batches, device, on, kept, acts):
        u = flat.shape[0]
        if counts is None:
            counts = torch.zeros(u * BINS, dtype=torch.long, device=flat.device)
            offset = torch.arange(u, device=flat.device)[:, None] * BINS
            if prefix is not None:
                prefix_on = prefix.to(flat.device).long()[:, None]
        maxes.append(flat.view(u, b, -1).amax(2).t().cpu())
        seen += flat.shape[1]
        keys = float_keys(flat)
        high = (keys >> 16).long() + BINS // 2
        if prefix is None:
            idx = (high + offset).view(-1)
        else:
            inside = high == prefix_on
            idx = ((keys & 0xFFFF).long() + offset)[inside]
        counts.index_add_(0, idx, torch.ones(1, dtype=torch.long, device=flat.device).expand(idx.numel()))
    if counts is None:
        raise DataError("histogram_pass got no images")
    result = ThresholdHistogram(layer, counts.view(-1, BINS).cpu(), seen, torch.cat(maxes),
                                None if prefix is None else prefix.long().cpu())
    return (result, kept) if keep_acts else result
