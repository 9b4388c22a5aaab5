"""Concept data for network dissection: concept names, the shapes dataset's label maps, batches.

Concept masks arrive as label maps: each batch is ``(images, labels)`` with
labels (B, L, Hm, Wm) int64, every pixel a global concept id in 1..K (0 =
none); L layers let several masks overlap (shapes: one layer per category;
Broden: one per mask file, image-level labels fill a whole layer). Concept c is
present at a pixel when any layer holds c. :class:`ConceptSet` names the ids.

:class:`ShapesConcepts` serves the shapes dataset this way (as
:class:`analysis.broden.BrodenData` serves a Broden directory), and
:func:`concept_batches` turns either into the normalised batches that
:mod:`analysis.dissection` consumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainables.errors import ConfigError

__all__ = [
    "ConceptBatches",
    "ConceptSet",
    "ShapesConcepts",
    "concept_batches",
    "shapes_concepts",
    "shapes_labels",
]


@dataclass(frozen=True)
class ConceptSet:
    """Names and categories of concept ids 1..K (id 0 = no concept).

    Attributes:
        names: (K,) concept names; ``names[i]`` is id ``i + 1``.
        categories: (K,) the category of each concept (``shape``, ``colour``, ``object``...).
    """

    names: tuple[str, ...]
    categories: tuple[str, ...]

    def __post_init__(self):
        if len(self.names) != len(self.categories):
            raise ConfigError(f"{len(self.names)} concept names but {len(self.categories)} categories")

    def __len__(self) -> int:
        return len(self.names)

    def category_names(self) -> list[str]:
        return list(dict.fromkeys(self.categories))


def shapes_concepts() -> ConceptSet:
    """The shapes dataset's concepts: ids 1.. run over ``CONCEPTS[c]`` for c in ``CATEGORIES`` order."""
    from trainables.data import CATEGORIES, CONCEPTS

    names = tuple(n for c in CATEGORIES for n in CONCEPTS[c])
    cats = tuple(c for c in CATEGORIES for _ in CONCEPTS[c])
    return ConceptSet(names, cats)


def shapes_labels(segmentation: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 per-category maps of ``ShapesData`` -> (N, 3, H, W) int64 global ids."""
    from trainables.data import CATEGORIES, CONCEPTS

    offsets = torch.tensor([0] + [len(CONCEPTS[c]) for c in CATEGORIES[:-1]]).cumsum(0).view(1, -1, 1, 1)
    seg = segmentation.long()
    return torch.where(seg > 0, seg + offsets, 0)


class ShapesConcepts:
    """Shapes images with their concept label maps; the same interface as :class:`analysis.broden.BrodenData`.

    ``num_images``, ``mask_size``, ``concepts`` and ``load(indices) -> (uint8
    images (n, 3, H, W), int64 global-id label maps (n, 3, H, W))``.
    """

    def __init__(self, images: torch.Tensor, segmentation: torch.Tensor):
        self.images, self.labels = images, shapes_labels(segmentation)
        self.concepts = shapes_concepts()
        self.mask_size = tuple(segmentation.shape[-2:])

    @classmethod
    def generate(cls, n: int, image_size: int = 32, seed: int = 0) -> ShapesConcepts:
        from trainables.data import make_shapes

        d = make_shapes(n, image_size, seed)
        return cls(d.images, d.segmentation)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    def __len__(self) -> int:
        return self.num_images

    def load(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]


class ConceptBatches(Sequence):
    """Evaluation batches (normalised float images, label maps) of ``data``'s images ``indices``, on ``device``.

    Each batch is loaded when it is read, so a task holds one batch of images at a
    time, not its whole shard (a shard of 8,000 Broden images at 224 px would be
    about 5 GB); re-iterable, so passes that read the batches twice load them twice.
    """

    def __init__(self, data, indices, *, batch_size: int, mean_std, device: str | torch.device = "cpu"):
        self.data, self.device = data, device
        self.mean, self.std = (torch.tensor(v, device=device).view(1, -1, 1, 1) * 255 for v in mean_std)
        indices = torch.as_tensor(indices, dtype=torch.long)
        self.parts = [indices[i : i + batch_size] for i in range(0, indices.numel(), batch_size)]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        images, labels = self.data.load(self.parts[i])
        return (images.to(self.device).float() - self.mean) / self.std, labels.to(self.device)


def concept_batches(data, indices, *, batch_size: int, mean_std, device: str | torch.device = "cpu") -> ConceptBatches:
    """:class:`ConceptBatches` of ``data``'s images ``indices``: loaded batch by batch as they are read."""
    return ConceptBatches(data, indices, batch_size=batch_size, mean_std=mean_std, device=device)
