"""The generated ``shapes`` dataset: offline, deterministic from a seed (see :func:`make_shapes`).

Each image is a grey textured background with one or two coloured shapes of
one kind; its class is (shape kind, texture), 4 x 5 = 20 classes; per-pixel
concept maps in three categories (shape, colour, texture) make it the ground
truth for testing network dissection. Registered as a dataset in
:mod:`trainables.datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainables.errors import DataError

__all__ = [
    "CATEGORIES", "COLOURS", "CONCEPTS", "SHAPES", "SHAPES_CLASSES", "TEXTURES", "ShapesData", "make_shapes",
]

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
