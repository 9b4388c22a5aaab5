"""Count records of ablation runs: per-class correct counts, mergeable over shards.

:class:`ClassCounts` is one evaluation (correct and images per class);
:class:`AblationCounts` is a per-unit ablation (:func:`analysis.ablation.ablate_units`)
with its baseline and the images each ablation lost (for the paired tests of
:mod:`analysis.rankings`).

Results are mergeable (after dissect's ``tally.py``): :class:`AblationCounts`
holds integer counts, so shards over data add up (``a + b``) and chunks over
units concatenate (:meth:`AblationCounts.concat`); :meth:`AblationCounts.merge`
does both for a grid of (unit chunk, data shard) results, and ``state_dict`` /
``from_state_dict`` carry it as plain tensors (Ray, ``torch.save`` with
``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from trainables.errors import ConfigError

__all__ = ["AblationCounts", "ClassCounts"]


def _check_same(what: str, a, b) -> None:
    if isinstance(a, torch.Tensor):
        same = a.shape == b.shape and torch.equal(a, b)
    else:
        same = a == b
    if not same:
        raise ConfigError(f"cannot merge ablation results with different {what}")


@dataclass
class ClassCounts:
    """Correct predictions and images per class over some images; shards add up.

    Attributes:
        correct: (K,) int64 correctly classified images of each class.
        total: (K,) int64 images of each class.
    """

    correct: torch.Tensor
    total: torch.Tensor

    @classmethod
    def zeros(cls, num_classes: int) -> ClassCounts:
        return cls(torch.zeros(num_classes, dtype=torch.long), torch.zeros(num_classes, dtype=torch.long))

    def __add__(self, other: ClassCounts) -> ClassCounts:
        _check_same("class counts", self.total.shape, other.total.shape)
        return ClassCounts(self.correct + other.correct, self.total + other.total)

    @property
    def accuracy(self) -> float:
        """Overall accuracy (correct / images, i.e. weighted by class size); NaN without images."""
        n = int(self.total.sum())
        return float(self.correct.sum()) / n if n else float("nan")

    @property
    def class_acc(self) -> torch.Tensor:
        """(K,) float64 per-class accuracy; NaN for classes without images."""
        return self.correct.double() / self.total.double()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"correct": self.correct.clone(), "total": self.total.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> ClassCounts:
        return cls(torch.as_tensor(state["correct"]).long(), torch.as_tensor(state["total"]).long())


@dataclass
class AblationCounts:
    """Per-unit, per-class correct counts of single-unit ablations, plus the baseline.

    Attributes:
        layer: the unit layer as requested (``conv5_3`` = after relu5_3).
        units: (U,) int64 unit indices, one per row of ``correct``.
        correct: (U, K) int64; ``correct[i, k]`` = images of class k classified
            correctly with unit ``units[i]`` set to zero.
        total: (K,) int64 images of class k (the same images for every unit).
        baseline_correct: (K,) int64 correct with no unit ablated.
        lost: (U, K) int64 images of class k correct without ablation and wrong
            with unit ``units[i]`` removed; with :attr:`gained` (wrong -> correct)
            these are the discordant pairs of a paired test on the same images
            (McNemar, :func:`analysis.stats.mcnemar_exact`).
    """

    layer: str
    units: torch.Tensor
    correct: torch.Tensor
    total: torch.Tensor
    baseline_correct: torch.Tensor
    lost: torch.Tensor

    def __post_init__(self) -> None:
        u, k = self.units.numel(), self.total.numel()
        if (self.units.dim() != 1 or self.correct.shape != (u, k) or self.baseline_correct.shape != (k,)
                or self.lost.shape != (u, k)):
            raise ConfigError(
                f"inconsistent ablation counts: units {tuple(self.units.shape)}, correct "
                f"{tuple(self.correct.shape)}, total {tuple(self.total.shape)}, baseline "
                f"{tuple(self.baseline_correct.shape)}, lost {tuple(self.lost.shape)}"
            )
        gained = self.gained
        if bool((self.lost < 0).any() or (self.lost > self.baseline_correct).any() or (gained < 0).any()
                or (gained > self.total - self.baseline_correct).any()):
            raise ConfigError("inconsistent ablation counts: lost/gained images do not fit the correct counts")

    @property
    def gained(self) -> torch.Tensor:
        """(U, K) int64 images wrong without ablation and correct with the unit removed."""
        return self.correct - self.baseline_correct + self.lost

    @property
    def num_classes(self) -> int:
        return self.total.numel()

    @property
    def num_images(self) -> int:
        return int(self.total.sum())

    @property
    def accuracy(self) -> torch.Tensor:
        """(U, K) float64 per-class accuracy with each unit ablated (NaN for empty classes)."""
        return self.correct.double() / self.total.double()

    @property
    def baseline_accuracy(self) -> torch.Tensor:
        """(K,) float64 per-class accuracy of the unablated network."""
        return self.baseline_correct.double() / self.total.double()

    @property
    def baseline(self) -> ClassCounts:
        return ClassCounts(self.baseline_correct, self.total)

    def __add__(self, other: AblationCounts) -> AblationCounts:
        """Sum of two shards over disjoint data for the same units."""
        _check_same("layers", self.layer, other.layer)
        _check_same("units (sum data shards of the same unit chunk)", self.units, other.units)
        _check_same("class counts", self.total.shape, other.total.shape)
        return AblationCounts(
            self.layer,
            self.units.clone(),
            self.correct + other.correct,
            self.total + other.total,
            self.baseline_correct + other.baseline_correct,
            self.lost + other.lost,
        )

    @classmethod
    def concat(cls, parts: Sequence[AblationCounts]) -> AblationCounts:
        """Join chunks over disjoint units computed on the same data; rows sorted by unit."""
        if not parts:
            raise ConfigError("nothing to concatenate: no ablation results given")
        first = parts[0]
        for p in parts[1:]:
            _check_same("layers", first.layer, p.layer)
            _check_same("data (unit chunks must cover the same images)", first.total, p.total)
            _check_same("baselines (unit chunks must use the same model and images)", first.baseline_correct,
                        p.baseline_correct)
        units = torch.cat([p.units for p in parts])
        if units.unique().numel() != units.numel():
            raise ConfigError("cannot concatenate ablation results whose unit chunks overlap")
        order = units.argsort()
        correct = torch.cat([p.correct for p in parts])[order]
        lost = torch.cat([p.lost for p in parts])[order]
        return cls(first.layer, units[order], correct, first.total.clone(), first.baseline_correct.clone(), lost)

    @classmethod
    def merge(cls, parts: Iterable[AblationCounts]) -> AblationCounts:
        """Reduce a grid of results: sum the data shards of each unit chunk, then join the chunks.

        Every unit chunk must have been run on the same set of data shards
        (checked: the chunks' summed totals and baselines must agree).
        """
        by_units: dict[tuple[int, ...], AblationCounts] = {}
        for p in parts:
            key = tuple(p.units.tolist())
            by_units[key] = by_units[key] + p if key in by_units else p
        return cls.concat(list(by_units.values()))

    def select(self, units: Sequence[int]) -> AblationCounts:
        """The rows of ``units`` (in that order)."""
        row = {int(u): i for i, u in enumerate(self.units.tolist())}
        missing = [u for u in units if int(u) not in row]
        if missing:
            raise ConfigError(f"unit {missing[0]} is not in these ablation results")
        index = torch.tensor([row[int(u)] for u in units], dtype=torch.long)
        return AblationCounts(self.layer, self.units[index], self.correct[index], self.total.clone(),
                              self.baseline_correct.clone(), self.lost[index])

    def state_dict(self) -> dict:
        """Plain tensors and a string: ships through Ray, saves under ``weights_only=True``."""
        return {
            "layer": self.layer,
            "units": self.units.clone(),
            "correct": self.correct.clone(),
            "total": self.total.clone(),
            "baseline_correct": self.baseline_correct.clone(),
            "lost": self.lost.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> AblationCounts:
        try:
            return cls(
                str(state["layer"]),
                torch.as_tensor(state["units"]).long(),
                torch.as_tensor(state["correct"]).long(),
                torch.as_tensor(state["total"]).long(),
                torch.as_tensor(state["baseline_correct"]).long(),
                torch.as_tensor(state["lost"]).long(),
            )
        except KeyError as exc:
            raise ConfigError(f"not an ablation state dict: it has no key {exc}") from None
