"""``study dissect``: network dissection of a trained checkpoint, fanned out as Ray tasks.

Paper: PAPER.md section 1 (Figure 1: detector units per concept category at
conv5_3; Figure 3: top-activating images with the thresholded region). The
computation is :mod:`analysis.dissection`; this module is the driver around it
(DESIGN.md "Data flow" step 5), with the checkpoint resolution of
:mod:`study.sources` (a path or an MLflow run id), the resumable fan-out of
:mod:`study.fanout` and the MLflow run of :func:`study.analysis_runs.log_analysis_run`
(tags ``kind``, ``source_run_id``, nested under the checkpoint's study).

1. Concept data: ``dissection.concepts = shapes`` generates
   ``dissection.num_images`` shapes images at ``data.image_size`` with seed
   ``data.seed + 2`` (neither the training split, seed ``data.seed``, nor the
   test split, ``data.seed + 1``); ``broden`` reads ``dissection.broden_root``
   (every row of ``index.csv``, or ``dissection.split``'s; a seeded sample of
   ``num_images`` rows when there are more).
2. Pass 1: one task per data shard computes the shard's top activations
   (:func:`analysis.thresholds.threshold_pass`, ``k`` from the whole set's
   positions); the driver adds them and takes the thresholds. When those would
   not fit in 1 GiB per task (``dissection.threshold_method = auto``) or when
   asked (``histogram``), pass 1 is two radix passes instead, each one task per
   shard (:func:`analysis.thresholds.histogram_pass`): the same thresholds.
3. Pass 2: one task per shard counts intersections and areas
   (:func:`analysis.dissection.iou_pass`); for shapes, the pass-1 task also
   returns the shard's layer activations (a second return value kept in the
   object store) and pass 2 reuses them instead of running the network again.
   For Broden (large activations) pass 2 recomputes them.
4. The driver labels the units (each label with its null, :mod:`analysis.nulls`), writes ``units.csv``,
   Figures 1 and 3 and, with ``join``, the join with ablation (:mod:`study.join`), and logs them to one
   MLflow run tagged ``kind=dissection``. Tasks use ``ablation.num_gpus`` and ``ablation.max_retries``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
import torch

from analysis.counts import AblationCounts
from analysis.dissection import ConceptCounts, label_units
from analysis.figures import detectors_figure, top_images_figure
from analysis.hooks import num_units
from analysis.thresholds import (
    ThresholdHistogram,
    TopActivations,
    histogram_bytes,
    histogram_thresholds,
    threshold_bins,
    top_k_bytes,
)
from study.analysis_runs import log_analysis_run
from study.config import StudyConfig
from study.fanout import (
    MIN_SHARD_IMAGES,
    default_shards,
    fan_out,
    job_hash,
    job_plan,
    open_task,
    shard_bounds,
    task_resources,
)
from study.jobs import anchor
from study.runtime import init_ray
from study.sources import Source, check_model, expected_architecture, prepare
from trainables.datasets import dataset_spec
from trainables.errors import ConfigError

__all__ = ["DissectionResult", "dissect", "dissection_summary", "run_dissection"]

# Below this map side a unit's thresholded region cannot follow a concept's outline: the paper's
# conv5_3 is 14x14 at 224 px (NetDissect-Lite), a 32 px CIFAR image gives it 2x2.
MIN_MAP_SIDE = 7


def map_size(model, layer: str, data, cfg: StudyConfig) -> tuple[int, int]:
    """(h, w) of ``layer``'s activation map on the dissection images (one image through the trunk, on the CPU)."""
    from analysis.activations import layer_acts
    from analysis.concepts import concept_batches
    ((x, _),) = concept_batches(data, [0], batch_size=1, mean_std=dataset_spec(cfg.data.name).mean_std)
    with torch.no_grad():
        return tuple(layer_acts(model, layer, x).shape[-2:])


def coarse_map_warning(layer: str, size: tuple[int, int], image_side: int) -> str | None:
    """One line with what to do when ``layer``'s map is too coarse to segment anything, else None: the
    deepest VGG block whose maps are at least 7x7 at this image size (block k halves the side k - 1 times)."""
    if min(size) >= MIN_MAP_SIDE:
        return None
    block = max(1, min(5, 1 + math.floor(math.log2(max(image_side / MIN_MAP_SIDE, 1)))))
    return (f"warning: {layer}'s map is {size[0]}x{size[1]} on {image_side} px images, too coarse to segment "
            f"concepts (under {MIN_MAP_SIDE}x{MIN_MAP_SIDE}); dissect a shallower layer (--layer conv{block}_3, "
            f"{image_side >> (block - 1)}x{image_side >> (block - 1)} at this size), and ablate that layer too")


def check_image_size(cfg: StudyConfig, side: int) -> str | None:
    """None when the dissection images have the checkpoint's training size; else refuse, in one line, unless
    ``dissection.allow_other_size`` is set, and then return the tag that says so."""
    trained = cfg.data.image_size
    if side == trained:
        return None
    if not cfg.dissection.allow_other_size:
        raise ConfigError(
            f"the dissection images are {side} px but the checkpoint was trained on {trained} px, so the labels "
            f"would describe a regime the model never runs in; dissect at {trained} px (leave "
            "dissection.image_size unset) or set dissection.allow_other_size=true to dissect anyway")
    return f"{side} px images on a model trained at {trained} px"


# --------------------------------------------------------------------------- concept data


def concept_data(cfg: StudyConfig):
    """The images and concept label maps to dissect with (see the module docstring)."""
    d = cfg.dissection
    if d.concepts == "shapes":
        from analysis.concepts import ShapesConcepts

        size = d.image_size or dataset_spec(cfg.data.name).dissection_image_size(cfg.data)
        return ShapesConcepts.generate(d.num_images, size, cfg.data.seed + 2)
    if d.broden_root is None:
        raise ConfigError("dissection.concepts = broden needs dissection.broden_root (a Broden-format directory)")
    from analysis.broden import BrodenData

    how = semantics(cfg)
    return BrodenData(d.broden_root, split=how["split"], categories=how["categories"], max_images=d.num_images,
                      seed=d.seed)


# The paper's Broden categories (PAPER.md section 1; NetDissect-Lite's settings.CATAGORIES also has scene, texture).
PAPER_CATEGORIES = ["object", "part", "material", "color"]


def semantics(cfg: StudyConfig) -> dict:
    """The dissection options with the concept source's defaults filled in (README "Network dissection"):
    Broden takes NetDissect-Lite's (per-category denominator, thresholds on the raw maps, the paper's
    four categories, every row of index.csv); the generated shapes keep the whole-dataset denominator
    on upsampled maps. ``split`` is the Broden rows' filter (None: all rows)."""
    d = cfg.dissection
    broden = d.concepts == "broden"
    return {"denominator": d.denominator or ("per_category" if broden else "dataset"),
            "threshold_on": d.threshold_on or ("raw" if broden else "upsampled"),
            "categories": d.categories or (PAPER_CATEGORIES if broden else None),
            **({"split": None if d.split in (None, "all") else d.split} if broden else {})}


def _payload(cfg: StudyConfig, data) -> dict:
    """What a task needs to rebuild the data: the arrays for shapes, the directory for Broden."""
    if cfg.dissection.concepts == "shapes":
        return {"kind": "shapes", "images": data.images, "labels": data.labels}
    return {"kind": "broden", "root": cfg.dissection.broden_root, "max_images": cfg.dissection.num_images,
            "categories": data.categories, "seed": cfg.dissection.seed, "split": data.split}


def _data_from(payload: dict):
    if payload["kind"] == "shapes":
        from analysis.concepts import ShapesConcepts

        data = ShapesConcepts.__new__(ShapesConcepts)
        data.images, data.labels = payload["images"], payload["labels"]
        from analysis.concepts import shapes_concepts

        data.concepts, data.mask_size = shapes_concepts(), tuple(payload["labels"].shape[-2:])
        return data
    from analysis.broden import BrodenData

    return BrodenData(payload["root"], split=payload["split"], categories=payload["categories"],
                      max_images=payload["max_images"], seed=payload["seed"], check_files=False)


# --------------------------------------------------------------------------- Ray tasks


def _task_setup(state_dict, payload, job):
    from analysis.concepts import concept_batches

    model, device = open_task(state_dict, job)
    batches = concept_batches(_data_from(payload), job["indices"], batch_size=job["batch_size"],
                              mean_std=job["mean_std"], device=device)
    return model, batches, device


def threshold_task(state_dict: dict, payload: dict, job: dict):
    """Pass 1 by top_k on one data shard: (TopActivations state dict, the shard's layer activations or None)."""
    from analysis.thresholds import threshold_pass

    model, batches, device = _task_setup(state_dict, payload, job)
    out = threshold_pass(model, job["layer"], batches, quantile=job["quantile"],
                         total_positions=job["total_positions"], device=device, keep_acts=job["keep_acts"],
                         on=job["threshold_on"])
    top, acts = out if job["keep_acts"] else (out, None)
    return top.state_dict(), acts


def histogram_task(state_dict: dict, payload: dict, acts, job: dict):
    """One radix level of pass 1 on one data shard (level 2 when ``job["prefix"]`` is set):
    (ThresholdHistogram state dict, the shard's layer activations or None); ``acts`` skips the model."""
    from analysis.thresholds import histogram_pass

    model, batches, device = _task_setup(state_dict, payload, job)
    keep = job["keep_acts"] and acts is None
    out = histogram_pass(None if acts is not None else model, job["layer"], batches, device=device,
                         prefix=job["prefix"], keep_acts=keep, on=job["threshold_on"], acts=acts)
    hist, kept = out if keep else (out, acts)
    return hist.state_dict(), kept


def iou_task(state_dict: dict, payload: dict, acts, job: dict) -> dict:
    """Pass 2 on one data shard: ConceptCounts state dict (``acts`` from pass 1, or None to recompute)."""
    from analysis.dissection import iou_pass

    model, batches, device = _task_setup(state_dict, payload, job)
    counts = iou_pass(None if acts is not None else model, job["layer"], batches, job["thresholds"],
                      num_concepts=job["num_concepts"], device=device, acts=acts,
                      concept_category=job["concept_category"])
    return counts.state_dict()


# --------------------------------------------------------------------------- study dissect


@dataclass
class DissectionResult:
    units: pd.DataFrame  # label_units(...): unit, label, category, iou, threshold, detector
    top: TopActivations | ThresholdHistogram  # pass 1 (its image_max ranks Figure 3's images)
    counts: ConceptCounts
    out_dir: Path
    files: list[Path]
    run_id: str
    source: Source
    num_tasks: int
    cfg: StudyConfig
    map_size: tuple[int, int]
    warning: str | None  # the coarse-map line, when the layer's map is under MIN_MAP_SIDE
    computed: int = 0  # tasks run by this command (the rest were resumed from saved parts)
    join: object = None  # study.join.Join when the labels were joined with the ablation


# Pass 1's state per task (top values or radix counts) is bounded by this; top_k beyond it becomes histogram.
THRESHOLD_MEMORY_BYTES = 1 << 30


def threshold_method(cfg: StudyConfig, total_positions: int, units: int) -> str:
    """``top_k`` or ``histogram``: the configured method, or (``auto``) top_k when its values fit in
    :data:`THRESHOLD_MEMORY_BYTES` per task. Refuses a choice that does not fit, saying what does."""
    q, asked = cfg.dissection.quantile, cfg.dissection.threshold_method
    top_k = top_k_bytes(q, total_positions, units)
    method = asked if asked != "auto" else ("top_k" if top_k <= THRESHOLD_MEMORY_BYTES else "histogram")
    if method == "top_k" and top_k > THRESHOLD_MEMORY_BYTES:
        raise ConfigError(f"top_k thresholds at q = {q:g} over {total_positions} positions keep "
                          f"{top_k / 2**30:.1f} GiB per task (limit 1 GiB); use dissection.threshold_method=auto")
    if method == "histogram" and histogram_bytes(units) > THRESHOLD_MEMORY_BYTES:
        raise ConfigError(f"histogram thresholds for {units} units keep {histogram_bytes(units) / 2**30:.1f} GiB "
                          f"per task (limit 1 GiB); dissect a layer with fewer units")
    return method


def _pass_one(cfg: StudyConfig, method: str, jobs: dict, parts_dir: Path, quiet: bool):
    """Pass 1 as fanned-out tasks: (the merged TopActivations or level-1 ThresholdHistogram, the thresholds,
    each shard's kept activations or None, tasks computed, tasks in all)."""
    d, layer = cfg.dissection, cfg.dissection.layer
    shards = sorted(jobs)

    def merged(results, cls, prefix):
        parts = [cls.from_state_dict(results[f"{prefix}-{s}"]) for s in shards]
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    if method == "top_k":
        first = fan_out(cfg, threshold_task, {f"threshold-{s}": (*jobs[s][:2], {**jobs[s][2], "quantile": d.quantile})
                                              for s in shards},
                        parts_dir=parts_dir, desc=f"dissecting {layer}: thresholds", quiet=quiet, num_returns=2)
        top = merged(first.results, TopActivations, "threshold")
        acts = {s: (first.extra.get(f"threshold-{s}") or [None])[0] for s in shards}
        return top, top.thresholds(d.quantile), acts, len(first.computed), len(shards)
    coarse = fan_out(cfg, histogram_task, {f"histogram-{s}": (*jobs[s][:2], None, {**jobs[s][2], "prefix": None})
                                           for s in shards},
                     parts_dir=parts_dir, desc=f"dissecting {layer}: thresholds (radix 1/2)", quiet=quiet,
                     num_returns=2)
    level1 = merged(coarse.results, ThresholdHistogram, "histogram")
    prefix, _ = threshold_bins(level1, d.quantile)
    acts = {s: (coarse.extra.get(f"histogram-{s}") or [None])[0] for s in shards}
    fine = fan_out(cfg, histogram_task, {f"select-{s}": (*jobs[s][:2], acts[s], {**jobs[s][2], "prefix": prefix,
                                                                                  "keep_acts": False})
                                         for s in shards},
                   parts_dir=parts_dir, desc=f"dissecting {layer}: thresholds (radix 2/2)", quiet=quiet,
                   num_returns=2)
    level2 = merged(fine.results, ThresholdHistogram, "select")
    thresholds = histogram_thresholds(level1, level2, d.quantile)
    return level1, thresholds, acts, len(coarse.computed) + len(fine.computed), 2 * len(shards)


def dissect(cfg: StudyConfig, source: Source, *, out_dir: Path, num_shards: int | None = None,
            quiet: bool = False, join: bool | AblationCounts = False) -> DissectionResult:
    """Both passes as Ray tasks over data shards, reduced here; write and log the results.

    Each finished task's result is saved under ``<out_dir>/parts/dissection-<job>/``
    (:func:`study.fanout.fan_out`), so a rerun of the same command after a crash
    or a kill computes only the shards still missing in each pass; the shards are
    fixed in ``plan.json`` on the first run. A later shard whose pass-1
    activations are gone (pass 1 was resumed) recomputes them.

    ``join``: also join the labels with the single-unit ablation of the layer (:mod:`study.join`; given, or
    computed on the test images when True) and log ``units_joined.csv`` and ``groups_joined.csv`` with the run.
    """
    started = time.time()
    d = cfg.dissection
    model = check_model(source, cfg)
    layer_units = num_units(model, d.layer)  # a wrong layer name fails here, listing the valid ones, before Ray starts
    data = concept_data(cfg)
    n = data.num_images
    layer_map = map_size(model, d.layer, data, cfg)
    first_image = data.load([0])[0]  # (1, 3, H, W): its side for the warning, its bytes for the job's identity
    side = int(first_image.shape[-1])
    other_size = check_image_size(cfg, side)
    warning = coarse_map_warning(d.layer, layer_map, side)
    how = semantics(cfg)
    raw = how["threshold_on"] == "raw"
    total = n * (layer_map[0] * layer_map[1] if raw else data.mask_size[0] * data.mask_size[1])
    method = threshold_method(cfg, total, layer_units)
    mean_std = dataset_spec(cfg.data.name).mean_std
    names = data.concepts.category_names()
    concept_category = (torch.tensor([names.index(c) for c in data.concepts.categories])
                        if how["denominator"] == "per_category" else None)
    identity = {"kind": "dissection", "version": 2, "checkpoint": source.fingerprint, "layer": d.layer,
                "concepts": d.concepts, "broden_root": d.broden_root, "num_images": n, "quantile": d.quantile,
                "image_size": d.image_size, "data": cfg.dump()["data"], "images": job_hash({"i": first_image}),
                **how, "seed": d.seed}
    parts_dir = out_dir / "parts" / f"dissection-{d.layer}-{job_hash(identity)}"
    init_ray(cfg)
    grid = job_plan(parts_dir, identity, lambda: {"shards": shard_bounds(
        n, num_shards or default_shards(n, 1, task_resources(cfg)[1], 2 * MIN_SHARD_IMAGES))})
    shards = [tuple(b) for b in grid["shards"]]
    keep_acts = d.concepts == "shapes"
    state_ref, payload_ref = ray.put(dict(source.state_dict)), ray.put(_payload(cfg, data))
    common = {"layer": d.layer, "expected": expected_architecture(cfg), "mean_std": mean_std,
              "batch_size": 256 if cfg.model.variant == "cifar" else 32}

    pass_one = {f"shard{s:03d}": (state_ref, payload_ref, {
        **common, "indices": torch.arange(lo, hi), "total_positions": total, "keep_acts": keep_acts,
        "threshold_on": how["threshold_on"]}) for s, (lo, hi) in enumerate(shards)}
    top, thresholds, acts, computed, tasks = _pass_one(cfg, method, pass_one, parts_dir, quiet)

    second = fan_out(cfg, iou_task, {
        f"iou-shard{s:03d}": (state_ref, payload_ref, acts[f"shard{s:03d}"], {
            **common, "indices": torch.arange(lo, hi), "thresholds": thresholds,
            "num_concepts": len(data.concepts), "concept_category": concept_category})
        for s, (lo, hi) in enumerate(shards)},
        parts_dir=parts_dir, desc=f"dissecting {d.layer}: IoU", quiet=quiet)
    parts = [ConceptCounts.from_state_dict(second.results[f"iou-shard{s:03d}"]) for s in range(len(shards))]
    counts = parts[0]
    for p in parts[1:]:
        counts = counts + p

    units = label_units(counts, data.concepts, d.iou_threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "units.csv", out_dir / "units.parquet"]
    units.to_csv(files[0], index=False)
    units.to_parquet(files[1], index=False)
    files += [detectors_figure(units, d.layer, d.iou_threshold, d.quantile, out_dir),
              top_images_figure(model, units, top, data, layer=d.layer, top_images=d.top_images, mean_std=mean_std,
                                out_dir=out_dir)]
    det = units[units["detector"]]
    metrics = {"dissection/detectors": float(len(det)), "dissection/mean_iou": float(units["iou"].mean()),
               "dissection/max_iou": float(units["iou"].max()),
               "dissection/labels_beating_null": float((units["q_value"] < 0.05).sum()),
               "dissection/positional_units": float(units["positional"].sum())}
    for cat in data.concepts.category_names():
        metrics[f"dissection/detectors_{cat}"] = float((det["category"] == cat).sum())
    metrics["dissection/detectors_near_ceiling"] = float((det["iou_to_ceiling"] >= 0.8).sum())
    computed += len(second.computed)
    joined = None
    if join is not False:
        from study.join import join_ablation, test_ablation

        ablation = join if isinstance(join, AblationCounts) else test_ablation(
            cfg, source, units["unit"].tolist(), out_dir=out_dir, quiet=quiet)
        joined = join_ablation(cfg, source, units, ablation, layer=d.layer, out_dir=out_dir, quiet=quiet)
        files, metrics = files + joined.files, {**metrics, **joined.metrics}
    run_id = log_analysis_run(
        cfg, source, kind="dissection", metrics=metrics,
        params={"dissection.num_images": n, "dissection.tasks": tasks + len(shards),
                "dissection.threshold_method": method,
                **{f"dissection.{k}": v if isinstance(v, str) else ",".join(v or names)  # the semantics used
                   for k, v in how.items() if k != "split"},
                **({"dissection.split": how["split"] or "all"} if "split" in how else {}),
                "dissection.map_size": f"{layer_map[0]}x{layer_map[1]}"},
        files=files, tags={**({"coarse_map": warning} if warning else {}),
                           **({"other_image_size": other_size} if other_size else {})} or None, started=started,
        summary=f"Network dissection of {d.layer} ({layer_map[0]}x{layer_map[1]} map) on {n} {d.concepts} images: "
                f"units.csv, Figure 1 (detectors per concept) and Figure 3 (top images).")
    return DissectionResult(units, top, counts, out_dir, files, run_id, source, tasks + len(shards), cfg, layer_map,
                            warning, computed, joined)


def run_dissection(
    checkpoint: str,
    config_path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    out: Path | None = None,
    num_shards: int | None = None,
    quiet: bool = False,
    join: bool | AblationCounts = False,
) -> DissectionResult:
    """``study dissect``: resolve the checkpoint (path or run id), check, fan out, write, log (``join``:
    :func:`dissect`'s)."""
    extra = [f"dissection.layer={layer}"] if layer is not None else []
    with tempfile.TemporaryDirectory(prefix="unitstudy-ckpt-") as tmp:
        cfg, source = prepare(checkpoint, config_path, overrides, layer=None, units=None, workdir=Path(tmp),
                              extra=extra)
        out_dir = Path(anchor(out if out is not None
                                  else Path("outputs") / f"dissection-{cfg.dissection.layer}-{source.name}"))
        return dissect(cfg, source, out_dir=out_dir, num_shards=num_shards, quiet=quiet, join=join)


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
        f"({d.layer} map {result.map_size[0]}x{result.map_size[1]}) in {result.num_tasks} tasks"
        f"{'' if result.computed == result.num_tasks else f' ({result.num_tasks - result.computed} resumed)'}; "
        f"{len(det)} detectors (IoU >= {d.iou_threshold:g} and beating the label's spatial null at BH q < 0.05; "
        f"top quantile {d.quantile:g}): {per_cat}; {near} of them within 0.8 of their IoU ceiling; "
        f"{int(u['positional'].sum())} units flagged positional (most active on the map's border)",
        "best units (IoU / ceiling, null IoU): " + ", ".join(
            f"{int(r.unit)} {r.label} ({r.category}) {r.iou:.3f}/{r.ceiling:.2f}, {r.iou_null:.3f}"
            f"{'' if r.detector else ' (not a detector)'}" for r in best.itertuples()),
        *([result.join.headline] if result.join is not None else []),
        f"outputs: {result.out_dir}/ ({', '.join(f.name for f in result.files)})",
        f"MLflow run {result.run_id} (kind=dissection{src})",
    ]
