"""``study dissect``: network dissection of a trained checkpoint, fanned out as Ray tasks.

Paper: PAPER.md section 1 (Figure 1: detector units per concept category at
conv5_3; Figure 3: top-activating images with the thresholded region). The
computation is :mod:`analysis.dissection`; this module is the driver around it
(DESIGN.md "Data flow" step 5), reusing :mod:`study.ablate`'s checkpoint
resolution (:func:`study.ablate.prepare`: a path or an MLflow run id), model
check and MLflow logging (:func:`study.ablate.log_run`: tags ``kind``,
``source_run_id``, nested under the checkpoint's study).

1. Concept data: ``dissection.concepts = shapes`` generates
   ``dissection.num_images`` shapes images at ``data.image_size`` with seed
   ``data.seed + 2`` (neither the training split, seed ``data.seed``, nor the
   test split, ``data.seed + 1``); ``broden`` reads ``dissection.broden_root``
   (its ``val`` split, the first ``num_images`` rows).
2. Pass 1: one task per data shard computes the shard's top activations
   (:func:`analysis.dissection.threshold_pass`, ``k`` from the whole set's
   positions); the driver adds them and takes the thresholds.
3. Pass 2: one task per shard counts intersections and areas
   (:func:`analysis.dissection.iou_pass`); for shapes, the pass-1 task also
   returns the shard's layer activations (a second return value kept in the
   object store) and pass 2 reuses them instead of running the network again.
   For Broden (large activations) pass 2 recomputes them.
4. The driver labels the units, writes ``units.csv``/``units.parquet``,
   ``figure1_detectors.png`` and ``figure3_top_images.png``, and logs them to one
   MLflow run tagged ``kind=dissection``.

Tasks use ``ablation.num_gpus`` (GPU share) and ``ablation.max_retries``; the
dissection section has no fields of its own for them.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
import torch

from analysis.dissection import (
    ConceptCounts,
    TopActivations,
    label_units,
)
from analysis.hooks import num_units
from study.ablate import (
    Source,
    check_model,
    expected_architecture,
    log_run,
    prepare,
    shard_bounds,
    remote_task,
    task_resources,
)
from study.config import StudyConfig
from study.runtime import init_ray
from trainables.errors import ConfigError, UnitstudyError

__all__ = ["DissectionResult", "dissect", "dissection_summary", "run_dissection"]

_MIN_SHARD_IMAGES = 64
# Below this map side a unit's thresholded region cannot follow a concept's outline: the paper's
# conv5_3 is 14x14 at 224 px (NetDissect-Lite), a 32 px CIFAR image gives it 2x2.
MIN_MAP_SIDE = 7


def map_size(model, layer: str, data, cfg: StudyConfig) -> tuple[int, int]:
    """(h, w) of ``layer``'s activation map on the dissection images (one image through the trunk, on the CPU)."""
    from analysis.concepts import concept_batches
    from analysis.dissection import layer_acts
    from trainables.data import MEAN_STD

    ((x, _),) = concept_batches(data, [0], batch_size=1, mean_std=MEAN_STD[cfg.data.name])
    with torch.no_grad():
        return tuple(layer_acts(model, layer, x).shape[-2:])


def coarse_map_warning(layer: str, size: tuple[int, int], image_side: int) -> str | None:
    """One line with what to do when ``layer``'s map is too coarse to segment anything, else None."""
    if min(size) >= MIN_MAP_SIDE:
        return None
    scale = image_side / min(size)
    need = int(math.ceil(MIN_MAP_SIDE * scale))
    return (f"warning: {layer}'s map is {size[0]}x{size[1]} on {image_side} px images, too coarse to segment "
            f"concepts (under {MIN_MAP_SIDE}x{MIN_MAP_SIDE}); dissect larger images "
            f"(--set dissection.image_size={need}) or a shallower layer (--layer conv4_3)")


# --------------------------------------------------------------------------- concept data


def concept_data(cfg: StudyConfig):
    """The images and concept label maps to dissect with (see the module docstring)."""
    d = cfg.dissection
    if d.concepts == "shapes":
        from analysis.concepts import ShapesConcepts
        from trainables.datasets import dataset_spec

        size = d.image_size or dataset_spec(cfg.data.name).dissection_image_size(cfg.data)
        return ShapesConcepts.generate(d.num_images, size, cfg.data.seed + 2)
    if d.broden_root is None:
        raise ConfigError("dissection.concepts = broden needs dissection.broden_root (a Broden-format directory)")
    from analysis.broden import BrodenData

    return BrodenData(d.broden_root, split="val", max_images=d.num_images)


def _payload(cfg: StudyConfig, data) -> dict:
    """What a task needs to rebuild the data: the arrays for shapes, the directory for Broden."""
    if cfg.dissection.concepts == "shapes":
        return {"kind": "shapes", "images": data.images, "labels": data.labels}
    return {"kind": "broden", "root": cfg.dissection.broden_root, "max_images": cfg.dissection.num_images}


def _data_from(payload: dict):
    if payload["kind"] == "shapes":
        from analysis.concepts import ShapesConcepts

        data = ShapesConcepts.__new__(ShapesConcepts)
        data.images, data.labels = payload["images"], payload["labels"]
        from analysis.concepts import shapes_concepts

        data.concepts, data.mask_size = shapes_concepts(), tuple(payload["labels"].shape[-2:])
        return data
    from analysis.broden import BrodenData

    return BrodenData(payload["root"], split="val", max_images=payload["max_images"])


# --------------------------------------------------------------------------- Ray tasks


def _task_setup(state_dict, payload, job):
    from analysis.concepts import concept_batches
    from analysis.evaluation import model_from_state_dict

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    model = model_from_state_dict(state_dict, device=device, **job["expected"])
    batches = concept_batches(_data_from(payload), job["indices"], batch_size=job["batch_size"],
                              mean_std=job["mean_std"], device=device)
    return model, batches, device


def threshold_task(state_dict: dict, payload: dict, job: dict):
    """Pass 1 on one data shard: (TopActivations state dict, the shard's layer activations or None)."""
    from analysis.dissection import threshold_pass

    model, batches, device = _task_setup(state_dict, payload, job)
    out = threshold_pass(model, job["layer"], batches, quantile=job["quantile"],
                         total_positions=job["total_positions"], device=device, keep_acts=job["keep_acts"])
    top, acts = out if job["keep_acts"] else (out, None)
    return top.state_dict(), acts


def iou_task(state_dict: dict, payload: dict, acts, job: dict) -> dict:
    """Pass 2 on one data shard: ConceptCounts state dict (``acts`` from pass 1, or None to recompute)."""
    from analysis.dissection import iou_pass

    model, batches, device = _task_setup(state_dict, payload, job)
    counts = iou_pass(None if acts is not None else model, job["layer"], batches, job["thresholds"],
                      num_concepts=job["num_concepts"], device=device, acts=acts)
    return counts.state_dict()


def _wait_all(refs: list, desc: str, quiet: bool) -> list:
    """ray.get of every ref, in order, with a tqdm bar following ray.wait; cancels the rest on a failure."""
    from tqdm import tqdm

    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task", disable=quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done[0])  # raise a task's error as soon as it lands
                bar.update(1)
        except ray.exceptions.RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref)
            if isinstance(exc.cause, UnitstudyError):
                raise exc.cause from None
            raise
    return ray.get(list(refs))


# --------------------------------------------------------------------------- outputs


def _figure1(units: pd.DataFrame, cfg: StudyConfig, out_dir: Path) -> Path:
    """Detector units per category (left) and per concept (right), like the paper's Figure 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    a.set_title(f"{cfg.dissection.layer}: {len(det)}/{len(units)} detectors")
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
    b.set_title(f"per concept (IoU >= {cfg.dissection.iou_threshold:g}, q = {cfg.dissection.quantile:g})")
    fig.tight_layout()
    path = out_dir / "figure1_detectors.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _figure3(model, units: pd.DataFrame, top: TopActivations, data, cfg: StudyConfig, out_dir: Path,
             n_units: int = 5) -> Path:
    """Top-activating images of the best units, the region ``a_u > t_u`` outlined (recomputed on the CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.concepts import concept_batches
    from analysis.dissection import layer_acts
    from analysis.upsample import upsample
    from trainables.data import MEAN_STD

    best = units.sort_values(["detector", "iou"], ascending=False).head(n_units)
    k = min(cfg.dissection.top_images, top.image_max.shape[0])
    fig, axes = plt.subplots(len(best), k, figsize=(1.6 * k, 1.7 * len(best)), squeeze=False)
    for row, (_, r) in enumerate(best.iterrows()):
        u = int(r["unit"])
        idx = top.image_max[:, u].topk(k).indices
        images, _ = data.load(idx)
        (x, _), = concept_batches(data, idx, batch_size=len(idx), mean_std=MEAN_STD[cfg.data.name])
        with torch.no_grad():
            a = upsample(layer_acts(model, cfg.dissection.layer, x)[:, u : u + 1], tuple(images.shape[-2:]))
        on = (a[:, 0] > float(r["threshold"])).numpy()
        for col in range(k):
            ax = axes[row, col]
            ax.imshow(images[col].permute(1, 2, 0).numpy())
            if on[col].any() and not on[col].all():
                ax.contour(on[col].astype(float), levels=[0.5], colors="yellow", linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"unit {u}\n{r['label']}\nIoU {r['iou']:.2f} / {r['ceiling']:.2f}", fontsize=7)
    fig.suptitle(f"{cfg.dissection.layer}: top-activating images, region a_u > t_u outlined "
                 "(row label: concept, IoU / its ceiling)", fontsize=9)
    fig.tight_layout()
    path = out_dir / "figure3_top_images.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- study dissect


@dataclass
class DissectionResult:
    units: pd.DataFrame  # label_units(...): unit, label, category, iou, threshold, detector
    top: TopActivations
    counts: ConceptCounts
    out_dir: Path
    files: list[Path]
    run_id: str
    source: Source
    num_tasks: int
    cfg: StudyConfig
    map_size: tuple[int, int]
    warning: str | None  # the coarse-map line, when the layer's map is under MIN_MAP_SIDE


def dissect(cfg: StudyConfig, source: Source, *, out_dir: Path, num_shards: int | None = None,
            quiet: bool = False) -> DissectionResult:
    """Both passes as Ray tasks over data shards, reduced here; write and log the results."""
    from trainables.data import MEAN_STD

    d = cfg.dissection
    model = check_model(source, cfg)
    num_units(model, d.layer)  # a wrong layer name fails here, listing the valid ones, before Ray starts
    data = concept_data(cfg)
    n = data.num_images
    layer_map = map_size(model, d.layer, data, cfg)
    warning = coarse_map_warning(d.layer, layer_map, int(data.load([0])[0].shape[-1]))
    total = n * data.mask_size[0] * data.mask_size[1]
    init_ray(cfg)
    gpus, slots = task_resources(cfg)
    shards = shard_bounds(n, num_shards or max(1, min(slots, n // _MIN_SHARD_IMAGES)))
    keep_acts = d.concepts == "shapes"
    state_ref, payload_ref = ray.put(dict(source.state_dict)), ray.put(_payload(cfg, data))
    common = {"layer": d.layer, "expected": expected_architecture(cfg), "mean_std": MEAN_STD[cfg.data.name],
              "batch_size": 256 if cfg.model.variant == "cifar" else 32}
    retries = cfg.ablation.max_retries

    first = [remote_task(threshold_task, gpus, retries, num_returns=2).remote(
        state_ref, payload_ref, {**common, "indices": torch.arange(lo, hi), "quantile": d.quantile,
                                 "total_positions": total, "keep_acts": keep_acts}) for lo, hi in shards]
    tops = _wait_all([f[0] for f in first], f"dissecting {d.layer}: thresholds", quiet)
    top = TopActivations.from_state_dict(tops[0])
    for t in tops[1:]:
        top = top + TopActivations.from_state_dict(t)
    thresholds = top.thresholds(d.quantile)

    second = [remote_task(iou_task, gpus, retries).remote(
        state_ref, payload_ref, acts if keep_acts else None,
        {**common, "indices": torch.arange(lo, hi), "thresholds": thresholds, "num_concepts": len(data.concepts)})
        for (lo, hi), (_, acts) in zip(shards, first)]
    parts = _wait_all(second, f"dissecting {d.layer}: IoU", quiet)
    counts = ConceptCounts.from_state_dict(parts[0])
    for p in parts[1:]:
        counts = counts + ConceptCounts.from_state_dict(p)

    units = label_units(counts, data.concepts, d.iou_threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "units.csv", out_dir / "units.parquet"]
    units.to_csv(files[0], index=False)
    units.to_parquet(files[1], index=False)
    files += [_figure1(units, cfg, out_dir), _figure3(model, units, top, data, cfg, out_dir)]
    det = units[units["detector"]]
    metrics = {"dissection/detectors": float(len(det)), "dissection/mean_iou": float(units["iou"].mean()),
               "dissection/max_iou": float(units["iou"].max())}
    for cat in data.concepts.category_names():
        metrics[f"dissection/detectors_{cat}"] = float((det["category"] == cat).sum())
    metrics["dissection/detectors_near_ceiling"] = float((det["iou_to_ceiling"] >= 0.8).sum())
    run_id = log_run(cfg, source, kind="dissection", name=f"dissection-{d.layer}-{source.name}", metrics=metrics,
                     params={"dissection.images": n, "dissection.tasks": 2 * len(shards),
                             "dissection.map_size": f"{layer_map[0]}x{layer_map[1]}"},
                     files=files, tags={"coarse_map": warning} if warning else None)
    return DissectionResult(units, top, counts, out_dir, files, run_id, source, 2 * len(shards), cfg, layer_map,
                            warning)


def run_dissection(
    checkpoint: str,
    config_path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    out: Path | None = None,
    num_shards: int | None = None,
    quiet: bool = False,
) -> DissectionResult:
    """``study dissect``: resolve the checkpoint (path or run id), check, fan out, write, log."""
    extra = [f"dissection.layer={layer}"] if layer is not None else []
    with tempfile.TemporaryDirectory(prefix="unitstudy-ckpt-") as tmp:
        cfg, source = prepare(checkpoint, config_path, overrides, layer=None, units=None, workdir=Path(tmp),
                              extra=extra)
        out_dir = Path(out) if out is not None else Path("outputs") / f"dissection-{cfg.dissection.layer}-{source.name}"
        return dissect(cfg, source, out_dir=out_dir, num_shards=num_shards, quiet=quiet)


def dissection_summary(result: DissectionResult, n: int = 8) -> list[str]:
    """A few lines for the terminal: detectors per category, the best units, where things went."""
    u = result.units
    det = u[u["detector"]]
    per_cat = ", ".join(f"{c} {k}" for c, k in det["category"].value_counts().items()) or "none"
    best = u.sort_values("iou", ascending=False).head(n)
    src = f", source run {result.source.run_id}" if result.source.run_id else ""
    d = result.cfg.dissection
    near = int((det["iou_to_ceiling"] >= 0.8).sum())
    return [*([result.warning] if result.warning else []),
        f"{d.layer}: {len(u)} units dissected on {result.top.image_max.shape[0]} {d.concepts} images "
        f"({d.layer} map {result.map_size[0]}x{result.map_size[1]}) in {result.num_tasks} tasks; "
        f"{len(det)} detectors (IoU >= {d.iou_threshold:g}, q = {d.quantile:g}): {per_cat}; "
        f"{near} of them within 0.8 of their IoU ceiling",
        "best units (IoU / ceiling): " + ", ".join(
            f"{int(r.unit)} {r.label} ({r.category}) {r.iou:.3f}/{r.ceiling:.2f}" for r in best.itertuples()),
        f"outputs: {result.out_dir}/ ({', '.join(f.name for f in result.files)})",
        f"MLflow run {result.run_id} (kind=dissection{src})",
    ]
