"""Tables and rankings of ablation results, with their paired significance tests.

From :class:`~analysis.counts.AblationCounts`: the per-unit, per-class table
(:func:`class_accuracy`), the per-unit table (:func:`unit_accuracy`), units
ranked overall (:func:`rank_units`, :func:`worst_units`, :func:`best_units`) and
per class (:func:`rank_units_per_class`). A change is tested against the
unablated model on the same images (McNemar's exact test, Agresti-Min interval,
Benjamini-Hochberg q-values; :mod:`analysis.stats`) and is "significant" when
its q-value is below :data:`ALPHA`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from analysis.counts import AblationCounts
from analysis.stats import bh_qvalues, mcnemar_exact, paired_proportion_interval
from trainables.errors import ConfigError

__all__ = [
    "ALPHA",
    "best_units",
    "class_accuracy",
    "rank_units",
    "rank_units_per_class",
    "unit_accuracy",
    "worst_units",
]

ALPHA = 0.05  # a change is "significant" when its Benjamini-Hochberg q-value is below this


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


def _verdict(change: pd.Series) -> pd.Series:
    return pd.Series(["bad" if c > 0 else "good" if c < 0 else "neutral" for c in change], index=change.index)


def rank_units(counts: AblationCounts) -> pd.DataFrame:
    """Units ranked overall, most important first: unit_accuracy plus ``rank`` and ``verdict``.

    Sorted by change ascending (ties by unit): rank 1 is the unit whose removal
    lowers accuracy most. verdict: "good" (removal lowers accuracy), "bad"
    (removal raises it; the paper's worst units), "neutral".
    """
    df = unit_accuracy(counts).sort_values(["change", "unit"], kind="stable").reset_index(drop=True)
    df["rank"] = range(1, len(df) + 1)
    df["verdict"] = _verdict(df["change"])
    return df


def worst_units(counts: AblationCounts, k: int) -> list[int]:
    """The k units whose removal raises overall accuracy most (largest change first; ties by unit).

    Taken by rank even when fewer than k units are strictly "bad"; filter
    :func:`rank_units` by verdict for only those.
    """
    df = unit_accuracy(counts).assign(neg=lambda d: -d["change"])
    return [int(u) for u in df.sort_values(["neg", "unit"], kind="stable")["unit"].head(k)]


def best_units(counts: AblationCounts, k: int) -> list[int]:
    """The k units whose removal lowers overall accuracy most (most negative change first; ties by unit)."""
    return [int(u) for u in rank_units(counts)["unit"].head(k)]


def rank_units_per_class(
    counts: AblationCounts, k: int = 5, class_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """For every class, its k best ("good") and k worst ("bad") units by change of that class's accuracy.

    Columns: class, [class_name], verdict ("good": removal lowers the class's
    accuracy most; "bad": raises it most), rank (1..k within class and verdict),
    unit, accuracy, baseline_accuracy, change. Ranking is by change alone, so a
    "bad" row can have change <= 0 when fewer than k units help the class.
    Classes without images are left out.
    """
    df = class_accuracy(counts, class_names).dropna(subset=["accuracy"])
    good = df.sort_values(["class", "change", "unit"], kind="stable").groupby("class").head(k)
    bad = (
        df.assign(neg=-df["change"])
        .sort_values(["class", "neg", "unit"], kind="stable")
        .groupby("class")
        .head(k)
        .drop(columns="neg")
    )
    parts = []
    for verdict, part in (("good", good), ("bad", bad)):
        part = part.copy()
        part["verdict"] = verdict
        part["rank"] = part.groupby("class").cumcount() + 1
        parts.append(part)
    cols = ["class"] + (["class_name"] if class_names is not None else []) + [
        "verdict",
        "rank",
        "unit",
        "accuracy",
        "baseline_accuracy",
        "change",
    ]
    cols += ["lost", "gained", "ci_low", "ci_high", "p_value", "q_value", "significant"]
    out = pd.concat(parts)[cols]
    return out.sort_values(["class", "verdict", "rank"], kind="stable").reset_index(drop=True)
