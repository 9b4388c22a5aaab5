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
from analysis.rankings import ALPHA, rank_units

__all__ = ["ablation_figures", "detectors_figure", "importances_figure", "optimization_history_figure",
           "top_images_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, **kw) -> Path:
    plt = _pyplot()
    fig.savefig(path, dpi=120, **kw)
    plt.close(fig)
    return path


def ablation_figures(counts: AblationCounts, out_dir: Path, class_names: Sequence[str] | None = None) -> list[Path]:
    """Per-unit overall accuracy change, sorted; and the units x classes heatmap of change (classes named
    when ``class_names`` is given and there are at most 50 of them)."""
    plt = _pyplot()
    ranked = rank_units(counts)
    change = ranked["change"].to_numpy() * 100
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sig = ranked["significant"].to_numpy()
    colours = ["lightgray" if not q else "tab:red" if c > 0 else "tab:blue" for c, q in zip(change, sig)]
    ax.bar(range(len(change)), change, width=1.0, color=colours)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"{counts.layer} units, sorted by change (most important left)\ncoloured: significant "
                  f"(exact McNemar, BH q < {ALPHA:g}; {int(sig.sum())} of {len(sig)} units), grey: not")
    ax.set_ylabel("accuracy change (points)")
    ax.set_title(f"Removing one {counts.layer} unit: accuracy change vs baseline "
                 f"{float(counts.baseline_correct.sum()) / counts.num_images:.2%} ({counts.num_images} images)")
    fig.tight_layout()
    bars = _save(fig, out_dir / "unit_change.png")

    order = torch.as_tensor([int((counts.units == u).nonzero()) for u in ranked["unit"]])
    delta = (counts.accuracy - counts.baseline_accuracy)[order].nan_to_num(0).numpy() * 100
    lim = max(abs(delta).max(), 1e-9)
    fig, ax = plt.subplots(figsize=(max(5, min(16, 0.05 * delta.shape[1] + 4)), 6))
    im = ax.imshow(delta, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xlabel("class")
    if class_names is not None and len(class_names) == delta.shape[1] and len(class_names) <= 50:
        ax.set_xticks(range(len(class_names)), list(class_names), rotation=90, fontsize=6)
    ax.set_ylabel("unit (sorted as in unit_change.png)")
    if len(ranked) <= 64:
        ax.set_yticks(range(len(ranked)), [str(u) for u in ranked["unit"]], fontsize=5)
    ax.set_title(f"{counts.layer}: per-class accuracy change\nwhen one unit is removed (points)")
    fig.colorbar(im, ax=ax, label="change (points); red: removal helps the class")
    fig.tight_layout()
    return [bars, _save(fig, out_dir / "heatmap.png")]


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
    b.set_title(f"per concept (IoU >= {iou_threshold:g}, q = {quantile:g})")
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


def importances_figure(importances: Mapping[str, float], metric: str, out_dir: Path) -> Path:
    """Horizontal bars of fANOVA parameter importances for ``metric``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(importances)))
    ax.barh(list(importances)[::-1], list(importances.values())[::-1])
    ax.set_xlabel(f"importance for {metric} (fANOVA)")
    return _save(fig, out_dir / "param_importances.png", bbox_inches="tight")
