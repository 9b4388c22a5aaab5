"""Datasets and loaders.

* ``shapes``: generated offline, deterministic from a seed (see :func:`make_shapes`).
  Each image is a grey textured background with one or two coloured shapes of
  one kind; its class is (shape kind, texture), 4 x 5 = 20 classes; per-pixel
  concept maps in three categories (shape, colour, texture) make it the ground
  truth for testing network dissection.
* ``cifar100``: torchvision ``CIFAR100``; ``places365``: torchvision ``Places365``.
  They are downloaded only when ``data.download`` is true; otherwise a missing
  dataset is one :class:`DataError` naming the path and how to get it.

Loading (after KellerJordan/cifar10-airbench): datasets that fit in memory live
as one uint8 tensor on the training device; crop, flip and normalisation run on
that device per batch; each epoch draws one seeded permutation that every DDP
rank slices into a disjoint shard of equal length (:class:`DeviceLoader`).
Places365-sized data goes through a torch DataLoader with a DistributedSampler
(:class:`SamplerLoader`).

Splits and their roles (DESIGN.md "Data"): ``train`` fits the weights; ``val``
(:func:`train_val_split`, ``data.val_fraction`` of the training split, seeded
by ``data.seed`` and stratified by class) serves every choice (the sweep's
objective and ASHA, the best trial, unit selection); ``test`` is reported and
never chosen on. The training loader never sees a validation image, on any rank.
For Places365, whose test labels are not public, ``val`` is carved from
train-standard and the official val split plays ``test``.
"""

from __future__ import annotations

import math
import urllib.error
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from trainables.errors import DataError

# --------------------------------------------------------------------------- shapes

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
TEXTURES = ("stripes", "checker", "dots", "noise", "grid")
CATEGORIES = ("shape", "colour", "texture")
CONCEPTS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES}
_RGB = torch.tensor(
    [[220, 30, 30], [30, 190, 40], [40, 60, 230], [240, 220, 30], [220, 40, 220], [30, 210, 220]],
    dtype=torch.float32,
)
SHAPES_CLASSES = tuple(f"{s}/{t}" for s in SHAPES for t in TEXTURES)
NUM_CLASSES = {"shapes": len(SHAPES_CLASSES), "cifar100": 100, "places365": 365}

MEAN_STD = {
    "shapes": ((0.45, 0.45, 0.45), (0.25, 0.25, 0.25)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "places365": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class ShapesData:
    """A generated shapes split.

    Attributes:
        images: (N, 3, H, W) uint8 RGB.
        labels: (N,) int64, ``shape_kind * len(TEXTURES) + texture``.
        segmentation: (N, 3, H, W) uint8, one map per category in CATEGORIES order;
            0 = no concept of that category at the pixel, k = ``CONCEPTS[category][k - 1]``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    segmentation: torch.Tensor

    classes = SHAPES_CLASSES
    categories = CATEGORIES
    concepts = CONCEPTS

    def __len__(self) -> int:
        return self.labels.shape[0]

    def concept_mask(self, category: str, concept: str) -> torch.Tensor:
        """(N, H, W) bool mask s_c of one concept."""
        c = CATEGORIES.index(category)
        return self.segmentation[:, c] == CONCEPTS[category].index(concept) + 1


def _shape_masks(kind: torch.Tensor, cx, cy, r, xs, ys) -> torch.Tensor:
    """(N, H, W) bool: pixels inside shape ``kind[i]`` centred (cx, cy) with radius r."""
    dx = xs - cx[:, None, None]  # (N, H, W) after broadcasting
    dy = ys - cy[:, None, None]
    r = r[:, None, None]
    adx, ady = dx.abs(), dy.abs()
    masks = torch.stack(
        [
            dx * dx + dy * dy <= r * r,  # circle
            torch.maximum(adx, ady) <= 0.8 * r,  # square
            (dy >= -r) & (dy <= 0.7 * r) & (adx <= 0.6 * (dy + r)),  # triangle, apex up
            ((adx <= 0.3 * r) & (ady <= r)) | ((ady <= 0.3 * r) & (adx <= r)),  # cross
        ]
    )  # (K, N, H, W)
    return masks.gather(0, kind[None, :, None, None].expand(1, *masks.shape[1:]))[0]


def make_shapes(n: int, image_size: int = 32, seed: int = 0) -> ShapesData:
    """Generate ``n`` shapes images, vectorised, deterministic in ``seed``.

    Background: two grey levels (random per image) laid out by one of TEXTURES.
    Objects: one shape of a random kind and colour; with probability 1/2 a
    smaller second shape of the same kind and another colour, drawn underneath.
    Pixel noise (sigma 6/255) keeps colours from being exact constants.
    """
    if n < 1 or image_size < 8:
        raise DataError(f"shapes needs n >= 1 and image_size >= 8, got n={n}, image_size={image_size}")
    g = torch.Generator().manual_seed(int(seed))
    S = image_size

    def U(lo, hi, size=(n,)):
        return lo + (hi - lo) * torch.rand(size, generator=g)

    kind = torch.randint(len(SHAPES), (n,), generator=g)
    texture = torch.randint(len(TEXTURES), (n,), generator=g)
    colour1 = torch.randint(len(COLOURS), (n,), generator=g)
    colour2 = (colour1 + torch.randint(1, len(COLOURS), (n,), generator=g)) % len(COLOURS)
    has_second = torch.rand(n, generator=g) < 0.5
    r1 = U(0.20 * S, 0.32 * S)
    r2 = U(0.11 * S, 0.18 * S)
    cx1, cy1 = U(r1, S - 1 - r1), U(r1, S - 1 - r1)
    cx2, cy2 = U(r2, S - 1 - r2), U(r2, S - 1 - r2)
    lo, hi = U(40, 100), U(140, 200)
    period = torch.randint(4, 9, (n,), generator=g).float()
    phase = torch.randint(0, 8, (n,), generator=g).float()
    vertical = torch.rand(n, generator=g) < 0.5
    coin = torch.rand((n, S, S), generator=g) < 0.5
    noise = torch.randn((n, 3, S, S), generator=g) * 6
    jitter = torch.randn((n, 2, 3), generator=g) * 10

    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    xs, ys = xs[None], ys[None]  # (1, H, W)
    p, ph = period[:, None, None], phase[:, None, None]
    along = torch.where(vertical[:, None, None], xs, ys)
    patterns = torch.stack(
        [
            ((along + ph) % p) < p / 2,  # stripes
            (torch.div(xs + ph, p / 2, rounding_mode="floor") + torch.div(ys, p / 2, rounding_mode="floor")) % 2 == 1,
            ((xs + ph) % p - p / 2) ** 2 + ((ys + ph) % p - p / 2) ** 2 < (p / 3) ** 2,  # dots
            coin,  # noise
            ((xs + ph) % p < 1.5) | ((ys + ph) % p < 1.5),  # grid
        ]
    )  # (T, N, H, W)
    on = patterns.gather(0, texture[None, :, None, None].expand(1, n, S, S))[0]
    grey = torch.where(on, hi[:, None, None], lo[:, None, None])  # (N, H, W)
    img = grey[:, None].expand(n, 3, S, S).clone()

    m1 = _shape_masks(kind, cx1, cy1, r1, xs, ys)
    m2 = _shape_masks(kind, cx2, cy2, r2, xs, ys) & has_second[:, None, None] & ~m1
    rgb1 = (_RGB[colour1] + jitter[:, 0]).clamp(0, 255)  # (N, 3)
    rgb2 = (_RGB[colour2] + jitter[:, 1]).clamp(0, 255)
    img = torch.where(m2[:, None], rgb2[:, :, None, None], img)
    img = torch.where(m1[:, None], rgb1[:, :, None, None], img)
    images = (img + noise).round().clamp(0, 255).to(torch.uint8)

    objects = m1 | m2
    seg = torch.zeros((n, 3, S, S), dtype=torch.uint8)
    seg[:, 0] = torch.where(objects, kind[:, None, None] + 1, 0).to(torch.uint8)
    seg[:, 1] = torch.where(m1, colour1[:, None, None] + 1, torch.where(m2, colour2[:, None, None] + 1, 0)).to(
        torch.uint8
    )
    seg[:, 2] = torch.where(objects, 0, texture[:, None, None] + 1).to(torch.uint8)
    labels = kind * len(TEXTURES) + texture
    return ShapesData(images=images, labels=labels, segmentation=seg)


# --------------------------------------------------------------------------- torchvision datasets


def _download_hint(name: str, root: Path, expected: str) -> str:
    return (
        f"{name} was not found under {root} (expected {expected}); set data.download=true on a machine "
        f"with internet access, or place the dataset there yourself, or set data.root to where it is"
    )


def load_cifar100(root: str | Path, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-100 as ((N, 3, 32, 32) uint8, (N,) int64) through torchvision's ``CIFAR100``."""
    from torchvision.datasets import CIFAR100

    root = Path(root)
    if not download and not (root / CIFAR100.base_folder).is_dir():
        raise DataError(_download_hint("CIFAR-100", root, f"{CIFAR100.base_folder}/"))
    try:
        ds = CIFAR100(str(root), train=train, download=download)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"could not download CIFAR-100 to {root}: {getattr(exc, 'reason', exc)}") from None
    except RuntimeError:
        raise DataError(
            f"CIFAR-100 under {root} is incomplete or corrupted; delete {root / CIFAR100.base_folder} and "
            "download it again"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)


def places365_dataset(
    root: str | Path, train: bool, download: bool = False, image_size: int = 224, augment: bool = True
):
    """torchvision ``Places365`` (small 256 px images) with the usual ImageNet-style transforms."""
    from torchvision import transforms as T
    from torchvision.datasets import Places365

    root = Path(root)
    split = "train-standard" if train else "val"
    listing = Places365._FILE_LIST_META[split][0]
    if not download and not (root / Places365._CATEGORIES_META[0]).is_file():
        raise DataError(_download_hint("Places365", root, f"{Places365._CATEGORIES_META[0]}, {listing} and the images"))
    mean, std = MEAN_STD["places365"]
    resize = int(round(image_size * 256 / 224))
    if train and augment:
        tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    else:
        tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])
    try:
        ds = Places365(str(root), split=split, small=True, download=download, transform=tf)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"could not download Places365 to {root}: {getattr(exc, 'reason', exc)}") from None
    except RuntimeError as exc:
        raise DataError(f"Places365 under {root} is incomplete: {str(exc).split('. ')[0]}") from None
    if len(ds) and not Path(ds.imgs[0][0]).is_file():
        raise DataError(f"Places365 under {root} lists images that are missing (first: {ds.imgs[0][0]})")
    return ds


def load_arrays(data: Mapping[str, Any], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-memory datasets as (uint8 images, int64 labels) on the CPU."""
    name = data["name"]
    if name == "shapes":
        n = data["num_train"] if train else data["num_test"]
        seed = data["seed"] if train else data["seed"] + 1
        d = make_shapes(n, data["image_size"], seed)
        return d.images, d.labels
    if name == "cifar100":
        return load_cifar100(data["root"], train, data["download"])
    raise DataError(f"dataset '{name}' does not fit the in-memory loader; use build_loaders")


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


def split_of(data: Mapping[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`train_val_split` with the data section's ``val_fraction`` and ``seed``."""
    return train_val_split(labels, data.get("val_fraction", 0.0), data.get("seed", 0))


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
    data: Mapping[str, Any],
    *,
    batch_size: int,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> Loaders:
    """(train, val, test) loaders for the data section ``data`` (a ``DataConfig`` dump).

    ``batch_size`` is per rank. Train and val come from the dataset's training
    split by :func:`split_of`; the training loader holds only the train indices.
    """
    name = data["name"]
    if name == "places365":
        from torch.utils.data import Subset

        kw = dict(batch_size=batch_size, device=device, rank=rank, world_size=world_size, seed=seed,
                  num_workers=data["loader_workers"])
        fit = places365_dataset(data["root"], True, data["download"], data["image_size"], data["augment"])
        train_idx, val_idx = split_of(data, torch.as_tensor(fit.targets))
        val = None
        if val_idx.numel():
            plain = places365_dataset(data["root"], True, data["download"], data["image_size"], augment=False)
            val = SamplerLoader(Subset(plain, val_idx.tolist()), train=False, **kw)
        test = places365_dataset(data["root"], False, data["download"], data["image_size"], data["augment"])
        return Loaders(SamplerLoader(Subset(fit, train_idx.tolist()), train=True, **kw), val,
                       SamplerLoader(test, train=False, **kw))
    mean, std = MEAN_STD[name]
    common = dict(batch_size=batch_size, device=device, mean=mean, std=std, rank=rank, world_size=world_size, seed=seed)
    train_x, train_y = load_arrays(data, train=True)
    test_x, test_y = load_arrays(data, train=False)
    train_idx, val_idx = split_of(data, train_y)
    train = DeviceLoader(train_x[train_idx], train_y[train_idx], train=True, augment=data["augment"],
                         crop_padding=data["crop_padding"], **common)
    train.dataset_indices = train_idx
    val = None
    if val_idx.numel():
        val = DeviceLoader(train_x[val_idx], train_y[val_idx], train=False, **common)
        val.dataset_indices = val_idx
    return Loaders(train, val, DeviceLoader(test_x, test_y, train=False, **common))
