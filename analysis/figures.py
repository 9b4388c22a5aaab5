"""Every figure the kit writes, as pure functions: data in, PNG paths out.

No config, no MLflow, no Ray: the ``study`` commands pass what a figure shows
(counts, a units table, the layer's name and the thresholds used) and log the
files these functions return (:mod:`study.tracking`).

* :func:`ablation_figures`: ``unit_change.png`` (per-unit accuracy change,
  sorted, significant units coloured) and ``heatmap.png`` (units x classes).
* :func:`detectors_figure`: ``figure1_detectors.png``, the paper's Figure 1.
* :func:`top_images_figure`: ``figure3_top_images.png``, the paper's Figure 3.
* :func:`optimization_history_figure`, :func:`importances_figure`: a search's
  summary on its parent run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from analysis.counts import AblationCounts
from analysis.rankings import ALPHA, rank_units, unit_power

__all__ = ["ablation_figures", "detectors_figure", "importances_figure", "optimization_history_figure",
           "top_images_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.style.use("default")  # optuna's plots switch the whole process to ggplot (grey panels, white grid lines)
    return plt


def _save(fig, path: Path, **kw) -> Path:
    plt = _pyplot()
    fig.savefig(path, dpi=120, **kw)
    plt.close(fig)
    return path


def ablation_figures(counts: AblationCounts, out_dir: Path, class_names: Sequence[str] | None = None) -> list[Path]:
    """Per-unit overall accuracy change, sorted; and the units x classes heatmap of change (classes named
    when ``class_names`` is given and there are at most 50 of them)."""
    return [_unit_change_figure(counts, out_dir), _heatmap_figure(counts, out_dir, class_names)]


def _unit_change_figure(counts: AblationCounts, out_dir: Path) -> Path:
    """Bars of each unit's change, sorted; significant ones coloured, a dot for no change, the MDE dashed."""
    plt = _pyplot()
    ranked = rank_units(counts)
    power = unit_power(counts, ranked)
    change = ranked["change"].to_numpy() * 100
    sig = ranked["significant"].to_numpy()
    x = range(len(change))
    fig, ax = plt.subplots(figsize=(max(8, min(20, 0.14 * len(change) + 2)), 4))
    colours = ["tab:red" if q and c > 0 else "tab:blue" if q else "0.6" for c, q in zip(change, sig)]
    ax.bar(x, change, width=0.8, color=colours)
    zero = change == 0
    ax.plot([i for i in x if zero[i]], [0] * int(zero.sum()), "o", color="0.3", markersize=2.5, linestyle="none",
            label=f"no change ({int(zero.sum())} units)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axhline(-100 * power.drop, color="tab:blue", linestyle="--", linewidth=0.8,
               label=f"drop detected with {power.power:.0%} power ({100 * power.drop:.2f} pt)")
    if power.gain < float("inf"):
        ax.axhline(100 * power.gain, color="tab:red", linestyle="--", linewidth=0.8,
                   label=f"gain detected with {power.power:.0%} power ({100 * power.gain:.2f} pt)")
    for colour, what in (("tab:blue", "useful: removal lowers accuracy, q < "), ("tab:red", "harmful: raises it, q < "),
                         ("0.6", "not significant")):
        ax.bar([0], [0], color=colour, label=what + (f"{ALPHA:g}" if what.endswith("< ") else ""))
    if len(change) <= 128:
        ax.set_xticks(list(x), [str(u) for u in ranked["unit"]], rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(change) - 0.4)
    ax.set_xlabel(f"{counts.layer} unit, sorted by change (exact McNemar test, Benjamini-Hochberg q over "
                  f"{len(change)} units; {int(sig.sum())} significant)")
    ax.set_ylabel("accuracy change (points)")
    ax.set_title(f"Removing one {counts.layer} unit: change of test accuracy\n"
                 f"baseline {float(counts.baseline_correct.sum()) / counts.num_images:.2%} on "
                 f"{counts.num_images:,} images ({power.errors} errors)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # outside: never over a bar or line
    fig.tight_layout()
    return _save(fig, out_dir / "unit_change.png")


def _heatmap_figure(counts: AblationCounts, out_dir: Path, class_names: Sequence[str] | None) -> Path:
    """Units (sorted as in unit_change.png) x classes, change of each class's accuracy in points."""
    plt = _pyplot()
    ranked = rank_units(counts)
    order = torch.as_tensor([int((counts.units == u).nonzero()) for u in ranked["unit"]])
    delta = (counts.accuracy - counts.baseline_accuracy)[order].nan_to_num(0).numpy() * 100
    lim = max(abs(delta).max(), 1e-9)
    k = delta.shape[1]
    named = class_names is not None and len(class_names) == k and k <= 50
    fig, ax = plt.subplots(figsize=(max(6, min(18, 0.32 * k + 3)), max(5, min(14, 0.12 * len(ranked) + 2))))
    im = ax.imshow(delta, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.grid(False)
    ax.set_xlabel("class")
    if named:
        ax.set_xticks(range(k), list(class_names), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("unit (sorted as in unit_change.png)")
    if len(ranked) <= 64:
        ax.set_yticks(range(len(ranked)), [str(u) for u in ranked["unit"]], fontsize=6)
    per_class = counts.total[counts.total > 0]
    lo, hi = (int(per_class.min()), int(per_class.max())) if per_class.numel() else (0, 0)
    images = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
    one = f"{100 / hi:.2g}" if lo == hi else f"{100 / hi:.2g}-{100 / lo:.2g}"
    ax.set_title(f"{counts.layer}: change of each class's accuracy when one unit is removed\n"
                 f"{images} test images per class: one image is {one} points", fontsize=10)
    fig.colorbar(im, ax=ax, label="change (points); red: removal helps the class")
    fig.tight_layout()
    return _save(fig, out_dir / "heatmap.png")


def detectors_figure(units: pd.DataFrame, layer: str, iou_threshold: float, quantile: float, out_dir: Path) -> Path:
    """Detector units per category (left) and per concept (right), like the paper's Figure 1."""
    plt = _pyplot()
    det = units[units["detector"]]
    near = det["iou_to_ceiling"] >= 0.8
    cats = list(dict.fromkeys(units["category"]))
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(cats)}
    per_cat = det["category"].value_counts().reindex(cats, fill_value=0)
    per_concept = det.groupby(["category", "label"]).size().sort_values(ascending=False)
    near_concept = det[near].groupby(["category", "label"]).size().reindex(per_concept.index, fill_value=0)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 3]})
    a.bar(range(len(cats)), per_cat.to_numpy(), color=[colours[c] for c in cats])
    a.set_xticks(range(len(cats)), cats, rotation=30)
    a.set_ylabel("detector units")
    from matplotlib.ticker import MaxNLocator

    for axis in (a, b):  # counts of units: whole numbers only
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    a.set_title(f"{layer}: {len(det)}/{len(units)} detectors")
    if len(per_concept):
        x = range(len(per_concept))
        b.bar(x, per_concept.to_numpy(), color=[colours[c] for c, _ in per_concept.index])
        b.bar(x, near_concept.to_numpy(), color="none", edgecolor="black", hatch="///", linewidth=0,
              label="IoU >= 0.8 x its ceiling (bounded by the areas, not the unit)")
        b.set_xticks(x, [lbl for _, lbl in per_concept.index], rotation=60, ha="right", fontsize=7)
        if near.any():
            b.legend(fontsize=7, loc="upper right")
    else:
        b.text(0.5, 0.5, "no detector units", ha="center", va="center", transform=b.transAxes)
    b.set_ylabel("detector units")
    b.set_title(f"per concept (IoU >= {iou_threshold:g}, top quantile {quantile:g})")
    fig.tight_layout()
    return _save(fig, out_dir / "figure1_detectors.png")


def top_images_figure(model, units: pd.DataFrame, top, data, *, layer: str, top_images: int, mean_std,
                      out_dir: Path, n_units: int = 5) -> Path:
    """Top-activating images of the best units, the region ``a_u > t_u`` outlined (recomputed on the CPU).

    ``top`` is the :class:`analysis.dissection.TopActivations` of the threshold
    pass, ``data`` the concept images (``load``), ``mean_std`` their normalisation.
    """
    from analysis.activations import layer_acts
    from analysis.concepts import concept_batches
    from analysis.upsample import upsample

    plt = _pyplot()
    best = units.sort_values(["detector", "iou"], ascending=False).head(n_units)
    k = min(top_images, top.image_max.shape[0])
    fig, axes = plt.subplots(len(best), k, figsize=(1.6 * k, 1.7 * len(best)), squeeze=False)
    for row, (_, r) in enumerate(best.iterrows()):
        u = int(r["unit"])
        idx = top.image_max[:, u].topk(k).indices
        images, _ = data.load(idx)
        (x, _), = concept_batches(data, idx, batch_size=len(idx), mean_std=mean_std)
        with torch.no_grad():
            a = upsample(layer_acts(model, layer, x)[:, u : u + 1], tuple(images.shape[-2:]))
        on = (a[:, 0] > float(r["threshold"])).numpy()
        for col in range(k):
            ax = axes[row, col]
            ax.imshow(images[col].permute(1, 2, 0).numpy())
            if on[col].any() and not on[col].all():
                ax.contour(on[col].astype(float), levels=[0.5], colors="yellow", linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"unit {u}\n{r['label']}\nIoU {r['iou']:.2f} / {r['ceiling']:.2f}", fontsize=7)
    fig.suptitle(f"{layer}: top-activating images, region a_u > t_u outlined "
                 "(row label: concept, IoU / its ceiling)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir / "figure3_top_images.png")


def optimization_history_figure(study, metric: str, out_dir: Path) -> Path:
    """Optuna's optimization history of ``study`` (an ``optuna.Study``), y axis named ``metric``."""
    import optuna

    plt = _pyplot()
    import warnings

    from matplotlib.ticker import MaxNLocator

    with warnings.catch_warnings():  # "experimental" since optuna 2.2; the figure is what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
    ax.set_ylabel(metric)
    ax.set_xlabel("trial (in the order Optuna proposed them)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = out_dir / "optimization_history.png"
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    return path


def importances_figure(importances: Mapping[str, float], metric: str, out_dir: Path, *, trials: int,
                       fidelity: str, reliable_from: int = 5) -> Path:
    """Horizontal bars of fANOVA parameter importances for ``metric``, from ``trials`` trials all run to
    ``fidelity`` (e.g. "30 epochs"); below ``reliable_from`` trials the title says they are not reliable."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.5 * len(importances)))
    ax.barh(list(importances)[::-1], list(importances.values())[::-1])
    ax.set_xlabel(f"importance for {metric} (fANOVA)")
    caveat = f"\nfewer than {reliable_from} trials: not reliable" if trials < reliable_from else ""
    ax.set_title(f"from {trials} trials, each run to {fidelity}{caveat}", fontsize=9,
                 color="tab:red" if caveat else "black")
    return _save(fig, out_dir / "param_importances.png", bbox_inches="tight")
