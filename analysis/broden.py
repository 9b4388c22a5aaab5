"""Reader for Broden-format concept data (Bau et al. 2017; NetDissect's ``dataset/broden1_*``).

A Broden directory holds:

* ``index.csv``: one row per image; columns ``image`` (path under ``images/``),
  ``split``, ``ih``, ``iw`` (image size), ``sh``, ``sw`` (segmentation size) and
  one column per category (``color``, ``object``, ``part``, ``material``,
  ``scene``, ``texture``...). A cell holds ';'-separated entries: PNG mask file
  names (under ``images/``) for pixel categories, or label numbers for
  image-level categories (the label covers the whole image). Empty = none.
* ``label.csv``: ``number, name, category, ...``; ``category`` lists the
  categories a label occurs in with counts (``object(12);part(3)`` or with
  ',' separators); the label's category here is the one with the largest count.
* ``c_<category>.csv``: ``code, number, name, ...`` - which labels a category
  uses; used for a label whose ``category`` cell is empty.
* pixel masks: PNG whose pixel label number is ``R + 256 * G`` (global numbers).

:class:`BrodenData` yields what :mod:`analysis.dissection` consumes: uint8
images (n, 3, ih, iw) and label maps (n, L, sh, sw) int64 of global label
numbers, one layer per mask file or image-level label (layers overlap freely).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch

from analysis.concepts import ConceptSet
from trainables.datasets import opened_image
from trainables.errors import DataError

__all__ = ["BrodenData", "read_labels"]

_META = ("image", "split", "ih", "iw", "sh", "sw")
_COUNTED = re.compile(r"\s*([^(),;]+?)\s*\((\d+)\)")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path.name} is missing from the Broden directory {path.parent}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_labels(root: str | Path, categories: list[str]) -> ConceptSet:
    """Concept ids 1..max(number) named from ``label.csv``; each with its main category."""
    root = Path(root)
    rows = _read_csv(root / "label.csv")
    by_category: dict[int, str] = {}
    for cat in categories:
        path = root / f"c_{cat}.csv"
        if path.is_file():
            for row in _read_csv(path):
                by_category.setdefault(int(row["number"]), cat)
    names, cats = {}, {}
    for row in rows:
        number = int(row["number"])
        if number <= 0:
            continue  # 0 is "no label"
        names[number] = row["name"]
        counted = [(m.group(1), int(m.group(2))) for m in _COUNTED.finditer(row.get("category") or "")]
        if counted:
            cats[number] = max(counted, key=lambda c: c[1])[0]
        elif (row.get("category") or "").strip():
            cats[number] = row["category"].strip()
        else:
            cats[number] = by_category.get(number, "unknown")
    if not names:
        raise DataError(f"{root / 'label.csv'} names no labels")
    k = max(names)
    return ConceptSet(tuple(names.get(i, f"label{i}") for i in range(1, k + 1)),
                      tuple(cats.get(i, "unknown") for i in range(1, k + 1)))


class BrodenData:
    """The images of one split of a Broden directory, with their concept label maps.

    Args:
        root: the Broden directory.
        split: rows of ``index.csv`` with this ``split`` (None: all rows).
        categories: category columns to use (default: every non-meta column); one that
            ``index.csv`` lacks is an error naming the ones it has.
        max_images: keep ``max_images`` rows: a random sample drawn with ``seed`` (kept in
            ``index.csv`` order) when the split has more, else every row.
        seed: the sample's seed.
        check_files: check up front that every file the kept rows name exists (the driver does;
            its tasks, given the same rows, need not).
    """

    def __init__(self, root: str | Path, split: str | None = "val", categories: list[str] | None = None,
                 max_images: int | None = None, seed: int = 0, check_files: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"no Broden directory at {self.root}; set dissection.broden_root to one")
        rows = _read_csv(self.root / "index.csv")
        if not rows:
            raise DataError(f"{self.root / 'index.csv'} has no rows")
        missing = [c for c in _META if c not in rows[0]]
        if missing:
            raise DataError(f"{self.root / 'index.csv'} lacks the column(s) {missing}")
        have = [c for c in rows[0] if c not in _META]
        unknown = [c for c in categories or [] if c not in have]
        if unknown:
            raise DataError(f"{self.root / 'index.csv'} has no category column {unknown}; it has {have}")
        self.categories = list(categories or have)
        self.split = split
        if split is not None:
            rows = [r for r in rows if r["split"] == split]
        if max_images is not None and len(rows) > max_images:
            picked = np.random.default_rng(seed).choice(len(rows), size=max_images, replace=False)
            rows = [rows[i] for i in sorted(picked.tolist())]
        if not rows:
            raise DataError(f"{self.root / 'index.csv'} has no images of split '{split}'")
        sizes = {(int(r["ih"]), int(r["iw"]), int(r["sh"]), int(r["sw"])) for r in rows}
        if len(sizes) != 1:
            raise DataError(f"Broden images of different sizes {sorted(sizes)[:3]}...; use one size per run")
        ih, iw, sh, sw = sizes.pop()
        self.rows, self.image_size, self.mask_size = rows, (ih, iw), (sh, sw)
        self.concepts = read_labels(self.root, self.categories)
        if check_files:
            self._check_files()

    def _check_files(self) -> None:
        """Every image and mask the kept rows name exists (one line naming the first missing one, before
        any task runs); the first row's files also decode. A file damaged further on fails the task
        that reads it with its name (:meth:`load`)."""
        for row in self.rows:
            names = [row["image"]] + [e.strip() for cat in self.categories for e in (row.get(cat) or "").split(";")
                                      if e.strip() and not e.strip().isdigit()]
            for name in names:
                if not (self.root / "images" / name).is_file():
                    raise DataError(f"Broden file {self.root / 'images' / name} named in index.csv is missing")
        self.load([0])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_images(self) -> int:
        return len(self.rows)

    def _image(self, name: str) -> np.ndarray:
        from PIL import Image

        with opened_image(self.root / "images" / name, "Broden image") as im:
            im = im.convert("RGB")
            if im.size != (self.image_size[1], self.image_size[0]):
                im = im.resize((self.image_size[1], self.image_size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)

    def _mask(self, name: str) -> np.ndarray:
        path = self.root / "images" / name
        with opened_image(path, "Broden mask") as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
        if rgb.shape[:2] != self.mask_size:
            raise DataError(f"Broden mask {path} is {rgb.shape[1]}x{rgb.shape[0]}, index.csv says "
                            f"{self.mask_size[1]}x{self.mask_size[0]}")
        return rgb[:, :, 0] + 256 * rgb[:, :, 1]

    def _layers(self, row: dict[str, str]) -> list[np.ndarray]:
        layers = []
        for cat in self.categories:
            for entry in (row.get(cat) or "").split(";"):
                entry = entry.strip()
                if not entry:
                    continue
                if entry.isdigit():  # image-level label: the whole image
                    layers.append(np.full(self.mask_size, int(entry), dtype=np.int64))
                else:
                    layers.append(self._mask(entry))
        return layers

    def load(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (n, 3, ih, iw), int64 label maps (n, L, sh, sw)) of rows ``indices``."""
        indices = [int(i) for i in indices]
        images = np.stack([self._image(self.rows[i]["image"]) for i in indices]).transpose(0, 3, 1, 2)
        per_image = [self._layers(self.rows[i]) for i in indices]
        L = max(1, max(len(p) for p in per_image))
        labels = np.zeros((len(indices), L, *self.mask_size), dtype=np.int64)
        for n, layers in enumerate(per_image):
            for j, layer in enumerate(layers):
                labels[n, j] = layer
        if labels.max() > len(self.concepts):
            raise DataError(f"a Broden mask holds label {labels.max()}, but label.csv names only "
                            f"{len(self.concepts)} labels")
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
