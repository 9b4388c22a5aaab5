"""Tables and rankings of ablation results, with their paired significance tests.

From :class:`~analysis.counts.AblationCounts`: the per-unit, per-class table
(:func:`class_accuracy`), the per-unit table (:func:`unit_accuracy`), units
ranked overall (:func:`rank_units`, :func:`worst_units`, :func:`best_units`) and
per class (:func:`rank_units_per_class`). A change is tested against the
unablated model on the same images (McNemar's exact test, Agresti-Min interval,
Benjamini-Hochberg q-values; :mod:`analysis.stats`) and is "significant" when
its q-value is below :data:`ALPHA`.

Evidence rules (DESIGN.md "Evidence"): a unit gets a verdict ("useful",
"harmful") only when its change is significant; units equal in change and
p-value share a rank and no list or selection is completed by unit id
(:func:`select_units`); every family of tests states what it could have
detected (:class:`Power`: the minimum detectable effect of
:func:`analysis.stats.mcnemar_mde` at the level of one more BH rejection).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike

from analysis.counts import AblationCounts
from analysis.stats import bh_level, bh_qvalues, mcnemar_exact, mcnemar_mde, paired_proportion_interval
from trainables.errors import ConfigError

__all__ = [
    "ALPHA",
    "POWER",
    "Power",
    "UnitSelection",
    "best_units",
    "class_power",
    "class_accuracy",
    "rank_units",
    "power_of",
    "rank_units_per_class",
    "select_units",
    "unit_accuracy",
    "unit_power",
    "worst_units",
]

ALPHA = 0.05  # a change is "significant" when its Benjamini-Hochberg q-value is below this
POWER = 0.8  # the minimum detectable effect is the change found with this probability


def _class_labels(counts_k: int, class_names: Sequence[str] | None) -> list:
    if class_names is None:
        return list(range(counts_k))
    if len(class_names) != counts_k:
        raise ConfigError(f"{len(class_names)} class names given for {counts_k} classes")
    return list(class_names)


def _significance(lost: np.ndarray, gained: np.ndarray, n: np.ndarray, family: np.ndarray) -> dict[str, np.ndarray]:
    """Paired-test columns for changes measured on the same images as the baseline.

    ``lost``/``gained`` are the discordant images (right -> wrong, wrong -> right)
    out of ``n``; ``family`` labels which rows share a Benjamini-Hochberg correction.
    Columns: ci_low, ci_high (95% Agresti-Min interval of the change), p_value
    (McNemar's exact test), q_value (BH within each family), significant (q < alpha).
    """
    empty = n == 0  # a class without images: nothing to test
    low, high = paired_proportion_interval(lost, gained, np.maximum(n, 1))
    p = mcnemar_exact(lost, gained)
    low, high, p = (np.where(empty, np.nan, v) for v in (low, high, p))
    q = np.full_like(p, np.nan)
    for f in np.unique(family):
        rows = family == f
        q[rows] = bh_qvalues(p[rows])
    return {"ci_low": low, "ci_high": high, "p_value": p, "q_value": q, "significant": q < ALPHA}


def class_accuracy(counts: AblationCounts, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Tidy per-unit, per-class table: one row per (unit, class).

    Columns: unit, class (index), [class_name], accuracy (with the unit ablated),
    baseline_accuracy, change (= accuracy - baseline_accuracy; > 0: removing the
    unit helps that class), correct, total, lost, gained, and the paired test of
    :func:`_significance` with q-values over the units of each class. Classes
    without images have NaN accuracy, interval and p-value.
    """
    u, k = counts.correct.shape
    df = pd.DataFrame(
        {
            "unit": counts.units.repeat_interleave(k).numpy(),
            "class": torch.arange(k).repeat(u).numpy(),
            "accuracy": counts.accuracy.reshape(-1).numpy(),
            "baseline_accuracy": counts.baseline_accuracy.repeat(u).numpy(),
            "correct": counts.correct.reshape(-1).numpy(),
            "total": counts.total.repeat(u).numpy(),
            "lost": counts.lost.reshape(-1).numpy(),
            "gained": counts.gained.reshape(-1).numpy(),
        }
    )
    df.insert(4, "change", df["accuracy"] - df["baseline_accuracy"])
    for column, values in _significance(df["lost"].to_numpy(), df["gained"].to_numpy(), df["total"].to_numpy(),
                                        df["class"].to_numpy()).items():
        df[column] = values
    if class_names is not None:
        df.insert(2, "class_name", [_class_labels(k, class_names)[i] for i in df["class"]])
    return df


def unit_accuracy(counts: AblationCounts) -> pd.DataFrame:
    """Overall accuracy per ablated unit, with its paired test against the unablated model.

    Columns: unit, accuracy, baseline_accuracy, change, lost, gained (images over
    all classes), ci_low, ci_high, p_value, q_value (BH across the units), significant.
    Overall = correct / images over all classes (weighted by class size; equal to
    the mean class accuracy on a balanced set such as Places365 val).
    """
    n = counts.num_images
    acc = counts.correct.sum(1).double() / n if n else torch.full((counts.units.numel(),), float("nan"))
    base = float(counts.baseline_correct.sum()) / n if n else float("nan")
    df = pd.DataFrame({"unit": counts.units.numpy(), "accuracy": acc.numpy(), "baseline_accuracy": base})
    df["change"] = df["accuracy"] - df["baseline_accuracy"]
    df["lost"] = counts.lost.sum(1).numpy()
    df["gained"] = counts.gained.sum(1).numpy()
    sig = _significance(df["lost"].to_numpy(), df["gained"].to_numpy(), np.full(len(df), n), np.zeros(len(df)))
    for column, values in sig.items():
        df[column] = values
    return df


def _verdict(change: pd.Series, significant: pd.Series) -> pd.Series:
    """"useful" (removal lowers accuracy), "harmful" (removal raises it) only where the change is significant;
    "neutral" otherwise, whatever the sign of a change the test cannot tell from none."""
    return pd.Series(["harmful" if s and c > 0 else "useful" if s and c < 0 else "neutral"
                      for c, s in zip(change, significant)], index=change.index)


def _shared_rank(keys: pd.DataFrame) -> list[int]:
    """Rank 1, 2, ... of rows already sorted by ``keys``; rows equal on every key share the lower rank."""
    ranks, previous = [], None
    for i, key in enumerate(keys.itertuples(index=False, name=None), start=1):
        ranks.append(ranks[-1] if key == previous else i)
        previous = key
    return ranks


def _head_whole_ties(rows: pd.DataFrame, keys: list[str], k: int) -> pd.DataFrame:
    """The first rows of ``rows`` (sorted by ``keys``) with a shared ``rank`` column, keeping a group of rows
    equal on ``keys`` only when all of it fits within the first ``k``: no tie is split by row order."""
    ranks = _shared_rank(rows[keys])
    sizes = rows.groupby(keys, sort=False)[keys[0]].transform("size").to_numpy()
    keep = [r + int(size) - 1 <= k for r, size in zip(ranks, sizes)]
    return rows.assign(rank=ranks)[keep]


def rank_units(counts: AblationCounts) -> pd.DataFrame:
    """Units ranked overall, most important first: unit_accuracy plus ``rank`` and ``verdict``.

    Sorted by change ascending, then by p-value (more evidence first): rank 1 is the
    unit whose removal lowers accuracy most. Units equal in both share a rank (their
    row order follows the unit id, their rank does not). verdict: "useful" (removal
    lowers accuracy; the paper's "good" units), "harmful" (raises it; the paper's
    "bad" units) only when significant (q < :data:`ALPHA`), else "neutral".
    """
    df = unit_accuracy(counts)
    df["net"] = df["gained"] - df["lost"]  # the change in images: ties compared exactly
    df = df.sort_values(["net", "p_value", "unit"], kind="stable").reset_index(drop=True)
    df["rank"] = _shared_rank(df[["net", "p_value"]])
    df["verdict"] = _verdict(df["change"], df["significant"])
    return df.drop(columns="net")


@dataclass(frozen=True)
class UnitSelection:
    """Up to k units whose removal changes accuracy in one direction, chosen without looking at unit ids.

    Attributes:
        direction: "worst" (removal raises accuracy) or "best" (removal lowers it).
        k: how many were asked for.
        units: the chosen units, largest change first (ties by evidence: smaller p first).
        qualifying: units whose change is non-zero in that direction.
        tied: units tied (same change and p-value) with a chosen one's successor for the last
            places: all of them would not fit in k, so none of them is chosen.
    """

    direction: str
    k: int
    units: tuple[int, ...]
    qualifying: int
    tied: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """``worst-3``: the direction and how many units were actually chosen."""
        return f"{self.direction}-{len(self.units)}"

    def shortfall(self) -> str | None:
        """One sentence when fewer than k units were chosen, else None."""
        if len(self.units) == self.k:
            return None
        way = "raises" if self.direction == "worst" else "lowers"
        text = (f"{self.direction}-{self.k}: {self.qualifying} unit(s) whose removal {way} accuracy on the selection "
                f"images; {len(self.units)} chosen")
        if self.tied:
            text += (f"; {len(self.tied)} more ({' '.join(map(str, self.tied))}) tie for the last "
                     f"{self.k - len(self.units)} place(s) and are left out rather than chosen by id")
        return text


def select_units(counts: AblationCounts, k: int, direction: str) -> UnitSelection:
    """The ``k`` units whose removal raises (``"worst"``) or lowers (``"best"``) overall accuracy most.

    Only units whose change is non-zero in that direction qualify. They are ranked by
    the change in images, then by McNemar's p-value (more evidence first); a group of
    units equal in both that straddles the k-th place is left out whole, so a
    selection is never completed by unit id. Fewer than k units come back when fewer
    qualify or a tie is left out (:meth:`UnitSelection.shortfall` says which).
    """
    if direction not in ("worst", "best"):
        raise ConfigError(f"direction must be 'worst' or 'best', got '{direction}'")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    df = unit_accuracy(counts)
    sign = 1 if direction == "worst" else -1
    df["gain"] = sign * (df["gained"] - df["lost"])  # > 0: the change goes the asked way, in images
    df = df[df["gain"] > 0].sort_values(["gain", "p_value"], ascending=[False, True], kind="stable")
    chosen: list[int] = []
    tied: list[int] = []
    for _, group in df.groupby(["gain", "p_value"], sort=False):
        units = [int(u) for u in group["unit"]]
        if len(chosen) + len(units) > k:
            tied = units if len(chosen) < k else []
            break
        chosen += units
    return UnitSelection(direction, k, tuple(chosen), len(df), tuple(tied))


def worst_units(counts: AblationCounts, k: int) -> UnitSelection:
    """:func:`select_units` in the direction "worst": removal raises accuracy (the paper's bad units)."""
    return select_units(counts, k, "worst")


def best_units(counts: AblationCounts, k: int) -> UnitSelection:
    """:func:`select_units` in the direction "best": removal lowers accuracy (the paper's good units)."""
    return select_units(counts, k, "best")


@dataclass(frozen=True)
class Power:
    """What a family of exact McNemar tests on the same images could detect (:func:`analysis.stats.mcnemar_mde`).

    images, errors: the images and the baseline's errors among them; level: the p-value
    one more rejection needs after Benjamini-Hochberg (:func:`analysis.stats.bh_level`);
    drop, gain: the accuracy changes (fractions, >= 0; inf: none) detected with
    probability ``power`` at that level.
    """

    images: int
    errors: int
    level: float
    drop: float
    gain: float
    power: float = POWER


def power_of(q_values: ArrayLike, images: int, errors: int, power: float = POWER) -> Power:
    """The :class:`Power` of tests with these q-values on ``images`` images with ``errors`` baseline errors."""
    level = bh_level(q_values, ALPHA)
    drop, gain = mcnemar_mde(images, errors, level, power)
    return Power(int(images), int(errors), level, float(drop), float(gain), power)


def unit_power(counts: AblationCounts, ranked: pd.DataFrame | None = None) -> Power:
    """The power of the per-unit tests of :func:`unit_accuracy` (``ranked``: that table, if already made)."""
    ranked = unit_accuracy(counts) if ranked is None else ranked
    n = counts.num_images
    return power_of(ranked["q_value"].to_numpy(), n, n - int(counts.baseline_correct.sum()))


def class_power(counts: AblationCounts, tidy: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per class: images, errors (baseline), level, mde_drop, mde_gain of its per-unit tests (fractions).

    ``tidy``: :func:`class_accuracy` of ``counts`` if already made. Classes without images are left out.
    """
    tidy = class_accuracy(counts) if tidy is None else tidy
    rows = []
    for c, part in tidy.groupby("class"):
        images = int(counts.total[int(c)])
        if images == 0:
            continue
        p = power_of(part["q_value"].to_numpy(), images, images - int(counts.baseline_correct[int(c)]))
        rows.append({"class": int(c), "images": images, "errors": p.errors, "level": p.level,
                     "mde_drop": p.drop, "mde_gain": p.gain})
    return pd.DataFrame(rows, columns=["class", "images", "errors", "level", "mde_drop", "mde_gain"])


def rank_units_per_class(
    counts: AblationCounts, k: int = 5, class_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """For every class, up to k units whose removal lowers its accuracy most and up to k that raise it most.

    Columns: class, [class_name], direction ("lowers" / "raises" the class's
    accuracy), rank (within class and direction; ties share it), unit, accuracy,
    baseline_accuracy, change, lost, gained, the paired test of :func:`class_accuracy`
    (q over the units of that class), verdict ("useful" / "harmful" only when
    significant, else "neutral"), and the class's power (:func:`class_power`:
    mde_drop, mde_gain, fractions). A unit with no change for the class is never
    listed; like :func:`select_units`, a group of units tied in change and p-value
    that straddles the k-th place is left out whole, so fewer than k rows can appear.
    Classes without images are left out.
    """
    tidy = class_accuracy(counts, class_names)
    df = tidy.dropna(subset=["accuracy"]).assign(net=lambda d: d["gained"] - d["lost"])
    parts = []
    for direction, sign in (("lowers", -1), ("raises", 1)):
        moved = df[sign * df["net"] > 0].assign(key=lambda d: -sign * d["net"])
        moved = moved.sort_values(["class", "key", "p_value", "unit"], kind="stable")
        for _, part in moved.groupby("class", sort=True):
            parts.append(_head_whole_ties(part, ["key", "p_value"], k).assign(direction=direction))
    cols = ["class"] + (["class_name"] if class_names is not None else []) + [
        "direction", "rank", "unit", "accuracy", "baseline_accuracy", "change", "lost", "gained", "ci_low",
        "ci_high", "p_value", "q_value", "significant", "verdict"]
    if not parts:
        return pd.DataFrame(columns=cols + ["mde_drop", "mde_gain"])
    out = pd.concat(parts)
    out["verdict"] = _verdict(out["change"], out["significant"])
    out = out[cols].merge(class_power(counts, tidy)[["class", "mde_drop", "mde_gain"]], on="class", how="left")
    return out.sort_values(["class", "direction", "rank", "unit"], kind="stable").reset_index(drop=True)
