"""Datasets and loaders.

Which datasets exist, and everything about each (classes, normalisation, where
it lives, how it loads), is the registry in :mod:`trainables.datasets`; the
generated ``shapes`` dataset is :mod:`trainables.shapes`. Both are re-exported
here for the code that imports them from this module. This module dispatches
through the registry and never compares dataset names.

Loading (after KellerJordan/cifar10-airbench): datasets that fit in memory live
as one uint8 tensor on the training device; crop, flip and normalisation run on
that device per batch; each epoch draws one seeded permutation that every DDP
rank slices into a disjoint shard of equal length (:class:`DeviceLoader`).
Streamed datasets (Places365-sized, ``spec.in_memory`` false) go through a torch
DataLoader with a DistributedSampler (:class:`SamplerLoader`).

Splits and their roles (DESIGN.md "Data"): ``train`` fits the weights; ``val``
(:func:`train_val_split`, ``data.val_fraction`` of the training split, seeded
by ``data.seed`` and stratified by class) serves every choice (the sweep's
objective and ASHA, the best trial, unit selection); ``test`` is reported and
never chosen on. The training loader never sees a validation image, on any rank.
For Places365, whose test labels are not public, ``val`` is carved from
train-standard and the official val split plays ``test``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from trainables.config import DataConfig
from trainables.datasets import (  # the registry; NUM_CLASSES / MEAN_STD are derived from it
    MEAN_STD,
    NUM_CLASSES,
    as_data_config,
    dataset_spec,
    load_cifar100,
    places365_dataset,
)
from trainables.errors import DataError
from trainables.shapes import (  # the generated dataset, kept importable from here
    CATEGORIES,
    COLOURS,
    CONCEPTS,
    SHAPES,
    SHAPES_CLASSES,
    TEXTURES,
    ShapesData,
    make_shapes,
)

__all__ = [
    "CATEGORIES", "COLOURS", "CONCEPTS", "MEAN_STD", "NUM_CLASSES", "SHAPES", "SHAPES_CLASSES", "TEXTURES",
    "DeviceLoader", "Loaders", "SamplerLoader", "ShapesData", "build_loaders", "load_arrays", "load_cifar100",
    "make_shapes", "places365_dataset", "split_of", "train_val_split",
]

# --------------------------------------------------------------------------- in-memory arrays


def load_arrays(data: DataConfig | Mapping[str, Any], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An in-memory dataset's split as (uint8 images, int64 labels) on the CPU (see :mod:`trainables.datasets`)."""
    data = as_data_config(data)
    return dataset_spec(data.name).arrays(data, train)


# --------------------------------------------------------------------------- train / val split


def train_val_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices) of a training split with ``labels``: disjoint, sorted, covering it.

    Class-stratified: each class c with n_c images gives ``round(val_fraction * n_c)``
    of them, drawn by one generator seeded with ``seed`` (classes in order), to val.
    ``val_fraction = 0`` gives an empty val split. The split depends on the labels,
    the fraction and the seed only, so every trial, rank and analysis sees the same one.
    """
    labels = torch.as_tensor(labels).long().cpu()
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction must lie in [0, 1), got {val_fraction}")
    n = labels.numel()
    if val_fraction == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().flatten()
        k = round(val_fraction * members.numel())
        picked.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    val = torch.cat(picked).sort().values
    if val.numel() == 0 or val.numel() == n:
        raise DataError(
            f"data.val_fraction = {val_fraction} of {n} training images leaves {'no' if not val.numel() else 'every'} "
            "image for validation; change data.val_fraction or use more training images"
        )
    in_val = torch.zeros(n, dtype=torch.bool)
    in_val[val] = True
    return (~in_val).nonzero().flatten(), val


def split_of(data: DataConfig | Mapping[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`train_val_split` with the data section's ``val_fraction`` and ``seed``.

    A plain dict without ``val_fraction`` (a partial section, as tests write them) has no
    validation split, as before the typed section existed; a full dump or a DataConfig has its own.
    """
    if isinstance(data, Mapping):
        return train_val_split(labels, data.get("val_fraction", 0.0), data.get("seed", 0))
    return train_val_split(labels, data.val_fraction, data.seed)


# --------------------------------------------------------------------------- loaders


def _shard(n: int, rank: int, world_size: int) -> slice:
    """Contiguous block ``rank`` of ``world_size`` near-equal blocks of range(n)."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


class DeviceLoader:
    """Batches from a uint8 image tensor held on ``device``.

    Training (``train=True``): each epoch draws ``randperm(N)`` from a generator
    seeded by (seed, epoch) - identical on every rank - drops the ``N % world_size``
    tail and gives rank r the r-th contiguous block, so shards are disjoint and of
    equal length; batches of ``batch_size`` (a last incomplete one is dropped, so
    every rank takes the same number of steps). Random crop (zero padding
    ``crop_padding``) and horizontal flip run on ``device``.

    Evaluation (``train=False``): no shuffling, no augmentation, and rank r takes
    the r-th contiguous block of ``range(N)``: every image is seen exactly once
    across ranks (blocks may differ in length by one).

    Yields ``(x, y)``: x (B, 3, H, W) float32 normalised by ``mean``/``std``, y (B,) int64.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.25, 0.25, 0.25),
        train: bool = True,
        augment: bool = True,
        crop_padding: int = 4,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"DeviceLoader needs (N, C, H, W) uint8 images, got {images.dtype} {tuple(images.shape)}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        # Positions of these images in the split they were taken from (set by build_loaders).
        self.dataset_indices = torch.arange(images.shape[0])
        self.batch_size, self.train, self.augment, self.pad = batch_size, train, augment and train, crop_padding
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    def head(self, n: int) -> DeviceLoader:
        """This evaluation loader over the first ``n`` images only (each rank its block of them)."""
        if self.train:
            raise DataError("head() takes the first images of an evaluation loader, not of a training one")
        out = copy.copy(self)
        out.images, out.labels, out.dataset_indices = self.images[:n], self.labels[:n], self.dataset_indices[:n]
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's image indices for the current epoch, in visiting order (CPU int64)."""
        n = self.num_images
        if not self.train:
            return torch.arange(n)[_shard(n, self.rank, self.world_size)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(n, generator=g)
        per_rank = n // self.world_size
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        if self.train:
            n = self.num_images // self.world_size
        else:
            s = _shard(self.num_images, self.rank, self.world_size)
            n = s.stop - s.start
        return n // self.batch_size if self.train and n >= self.batch_size else math.ceil(n / self.batch_size)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random crop with zero padding and horizontal flip, batched on x's device."""
        B, _, H, W = x.shape
        p = self.pad
        if p:
            x = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (B,), device=x.device, generator=g)
            ox = torch.randint(0, 2 * p + 1, (B,), device=x.device, generator=g)
            rows = (oy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
            cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
            x = x.permute(0, 2, 3, 1)[torch.arange(B, device=x.device)[:, None, None], rows, cols]  # (B, H, W, C)
            x = x.permute(0, 3, 1, 2)
        flip = torch.rand(B, device=x.device, generator=g) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices().to(self.device)
        n = idx.numel()
        stop = n - n % self.batch_size if self.train and n >= self.batch_size else n
        g = None
        if self.augment:
            g = torch.Generator(device=self.device).manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 65_537 + self.rank
            )
        for start in range(0, stop, self.batch_size):
            b = idx[start : min(start + self.batch_size, stop)]
            x = self.images[b]
            if g is not None:
                x = self._augment(x, g)
            yield (x.float() - self.mean) / self.std, self.labels[b]


class SamplerLoader:
    """A torch DataLoader with a DistributedSampler, moving batches to ``device``.

    For datasets too large for memory (Places365). Same interface as DeviceLoader.
    """

    def __init__(
        self,
        dataset,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 4,
    ):
        from torch.utils.data import DataLoader, DistributedSampler

        self.device = torch.device(device)
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train
        )
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=train,
            persistent_workers=num_workers > 0,
        )
        self.num_images = len(dataset)
        self._args = dict(batch_size=batch_size, device=device, train=train, rank=rank, world_size=world_size,
                          seed=seed, num_workers=num_workers)

    def head(self, n: int) -> SamplerLoader:
        """This evaluation loader over the first ``n`` images of its dataset only."""
        from torch.utils.data import Subset

        if self._args["train"]:
            raise DataError("head() takes the first images of an evaluation loader, not of a training one")
        return SamplerLoader(Subset(self.loader.dataset, range(min(n, self.num_images))), **self._args)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class Loaders(NamedTuple):
    """One rank's loaders: ``train`` (shuffled, augmented shard), ``val`` (None when
    ``data.val_fraction`` is 0) and ``test`` (each rank a disjoint block)."""

    train: DeviceLoader | SamplerLoader
    val: DeviceLoader | SamplerLoader | None
    test: DeviceLoader | SamplerLoader


def build_loaders(
    data: DataConfig | Mapping[str, Any],
    *,
    batch_size: int,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> Loaders:
    """(train, val, test) loaders for the data section ``data`` (a ``DataConfig`` or its dump).

    ``batch_size`` is per rank. Train and val come from the dataset's training
    split by :func:`split_of`; the training loader holds only the train indices.
    """
    cfg = as_data_config(data)
    spec = dataset_spec(cfg.name)
    if not spec.in_memory:
        from torch.utils.data import Subset

        kw = {"batch_size": batch_size, "device": device, "rank": rank, "world_size": world_size, "seed": seed,
              "num_workers": cfg.loader_workers}
        fit = spec.dataset(cfg, True, cfg.augment)
        train_idx, val_idx = split_of(data, torch.as_tensor(fit.targets))
        val = None
        if val_idx.numel():
            plain = spec.dataset(cfg, True, augment=False)
            val = SamplerLoader(Subset(plain, val_idx.tolist()), train=False, **kw)
        test = spec.dataset(cfg, False, cfg.augment)
        return Loaders(SamplerLoader(Subset(fit, train_idx.tolist()), train=True, **kw), val,
                       SamplerLoader(test, train=False, **kw))
    mean, std = spec.mean_std
    common = {"batch_size": batch_size, "device": device, "mean": mean, "std": std, "rank": rank,
              "world_size": world_size, "seed": seed}
    train_x, train_y = spec.arrays(cfg, train=True)
    test_x, test_y = spec.arrays(cfg, train=False)
    train_idx, val_idx = split_of(data, train_y)
    train = DeviceLoader(train_x[train_idx], train_y[train_idx], train=True, augment=cfg.augment,
                         crop_padding=cfg.crop_padding, **common)
    train.dataset_indices = train_idx
    val = None
    if val_idx.numel():
        val = DeviceLoader(train_x[val_idx], train_y[val_idx], train=False, **common)
        val.dataset_indices = val_idx
    return Loaders(train, val, DeviceLoader(test_x, test_y, train=False, **common))
