"""One set of headline numbers: the epoch a trial is judged and analysed at, and its accuracies.

The rule: **a trial stands on its last epoch.** That epoch's checkpoint is the
one kept (``checkpoint/`` of the trial run, its ``checkpoint_uri`` tag), the one
``study ablate``, ``study intervene`` and ``study dissect`` read, and its
validation accuracy is what Tune, ASHA and the best trial of a study are chosen
on. Its test accuracy is on the whole test split: the workers test the whole
split at the last epoch and at every epoch where ASHA may stop a trial
(:func:`study.sweep.asha_milestones`).

Every run carries them (in percent, two decimals, so accuracies that differ in
the third decimal never print as equal, and the UI's charts round nothing away):

* ``selected/val_acc_pct``, ``selected/test_acc_pct``, ``selected/epoch``
  (from 1): on a trial run, its kept checkpoint's epoch; on a study run, the
  chosen trial's; on an analysis run, the epoch of the checkpoint it read (from
  the checkpoint's own history);
* ``peak/val_acc_pct``, ``peak/epoch`` (trial runs): the highest validation
  accuracy of any epoch and the first epoch that reached it, for information
  only: no checkpoint of that epoch is kept, and nothing is chosen on it.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["PEAK", "SELECTED", "checkpoint_selected", "pct", "peak_metrics", "selected_metrics"]

SELECTED = ("selected/val_acc_pct", "selected/test_acc_pct", "selected/epoch")
PEAK = ("peak/val_acc_pct", "peak/epoch")


def pct(fraction: float) -> float:
    """An accuracy fraction as percent with two decimals (0.99749 -> 99.75)."""
    return round(100 * float(fraction), 2)


def whole_test(entry: dict[str, Any], epochs: int | None = None) -> bool:
    """Whether this epoch's test accuracy is on the whole test split.

    History entries record ``test/images`` and ``test/split_images``; entries
    without them (read back from MLflow) count as whole only at the last of
    ``epochs``.
    """
    n, split = entry.get("test/images"), entry.get("test/split_images")
    if n is not None and split is not None:
        return int(n) >= int(split)
    return epochs is not None and int(entry["epoch"]) + 1 == epochs


def selected_metrics(history: list[dict[str, Any]], epochs: int | None = None) -> dict[str, float]:
    """``selected/*`` of a trial from its epoch history (``epoch`` from 0, ``val/acc``, ``test/acc`` fractions):
    its last epoch. ``selected/test_acc_pct`` only when that epoch's test accuracy is on the whole test split."""
    if not history:
        return {}
    last = max(history, key=lambda h: int(h["epoch"]))
    out = {"selected/epoch": float(int(last["epoch"]) + 1)}
    if last.get("val/acc") is not None and not math.isnan(last["val/acc"]):
        out["selected/val_acc_pct"] = pct(last["val/acc"])
    if last.get("test/acc") is not None and whole_test(last, epochs):
        out["selected/test_acc_pct"] = pct(last["test/acc"])
    return out


def peak_metrics(val_acc_by_epoch: dict[int, float]) -> dict[str, float]:
    """``peak/*``: the highest ``val/acc`` of any epoch (epoch from 1) and the first epoch that reached it."""
    if not val_acc_by_epoch:
        return {}
    best = max(val_acc_by_epoch.values())
    first = min(e for e, v in val_acc_by_epoch.items() if v == best)
    return {"peak/val_acc_pct": pct(best), "peak/epoch": float(first)}


def checkpoint_selected(checkpoint: dict[str, Any]) -> dict[str, float]:
    """``selected/*`` of the checkpoint an analysis reads: its own epoch and that epoch's metrics, from the
    history the checkpoint carries (:mod:`trainables.loop`); ``selected/epoch`` alone when it has no history
    of that epoch; nothing for a bare state dict."""
    epoch = checkpoint.get("epoch")
    if not isinstance(epoch, int):
        return {}
    history = [h for h in checkpoint.get("history") or [] if int(h.get("epoch", -1)) == epoch]
    if not history:
        return {"selected/epoch": float(epoch + 1)}
    epochs = ((checkpoint.get("config") or {}).get("train") or {}).get("epochs")
    return selected_metrics(history, epochs)
