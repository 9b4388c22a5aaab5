"""``study ablate``: per-unit ablation of a trained checkpoint, fanned out as Ray tasks.

Paper: PAPER.md section 2 item 1 (the 512 x 365 matrix of per-class accuracy
with each conv5_3 unit removed). The computation is
:func:`analysis.ablation.ablate_units`; this module is the command around it
(DESIGN.md "Data flow" step 5):

1. :func:`study.sources.prepare` resolves the checkpoint (a path or an MLflow
   run id) and the config (data and model from the checkpoint's own config).
2. :func:`study.fanout.fan_out` runs one :func:`ablation_task` per (unit chunk,
   data shard), the state dict and the split's images put once; each finished
   part is saved at once, so a rerun after a crash computes only the missing
   parts (the grid is fixed in ``plan.json`` on the first run).
3. The parts are merged (:meth:`AblationCounts.merge`); the tidy table, the
   rankings and two figures (:func:`analysis.figures.ablation_figures`) are
   written and logged to one MLflow run tagged ``kind=ablation``, nested in the
   study that trained the checkpoint (:func:`study.analysis_runs.log_analysis_run`).

Sharding: over data first (each task ablates all units of its chunk on one
shard); unit chunks (``ablation.unit_chunk``) only split the units, and every
chunk re-runs the trunk on its images, so the default uses one data shard per
free slot divided among the chunks.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from analysis.counts import AblationCounts
from analysis.figures import ablation_figures
from analysis.hooks import check_units
from analysis.rankings import ALPHA, Power, class_accuracy, class_power, rank_units, rank_units_per_class, unit_power
from study.analysis_runs import log_analysis_run
from study.config import StudyConfig
from study.fanout import (
    FanOut,
    Shared,
    Split,
    chunks,
    common_job,
    default_shards,
    eval_batches,
    fan_out,
    job_hash,
    job_plan,
    open_task,
    put_shared,
    report_split,
    shard_bounds,
    task_resources,
)
from study.jobs import anchor
from study.runtime import init_ray
from study.sources import Source, check_model, prepare

__all__ = ["AblationResult", "ablate", "ablation_counts", "ablation_summary", "ablation_task", "run_ablation"]


# --------------------------------------------------------------------------- the Ray task


def ablation_task(state_dict: dict, images, labels, job: dict) -> dict:
    """One (unit chunk, data shard) of an ablation: the counts' ``state_dict()`` (plain CPU tensors).

    ``state_dict``, ``images`` and ``labels`` arrive resolved (top-level ObjectRefs,
    put once by the driver). ``job``: :func:`study.fanout.common_job` plus units,
    indices (positions in ``images``; dataset indices for streamed datasets),
    precision_check (positions re-checked in float64) and fail_marker (tests).
    """
    from analysis.ablation import ablate_units, precision_differences

    model, device = open_task(state_dict, job)
    dtype = torch.float64 if job["dtype"] == "float64" else torch.float32

    def batches_of(indices):
        return eval_batches(job["data"], images, labels, job["train"], indices, job["batch_size"], device)

    counts = ablate_units(model, job["layer"], batches_of(job["indices"]), job["units"], device=device,
                          num_classes=job["num_classes"], dtype=dtype)
    state = counts.state_dict()
    check = job["indices"][job["precision_check"]]
    state["precision_pairs"], state["precision_differ"] = (
        precision_differences(model, job["layer"], batches_of(check), job["units"], device=device,
                              num_classes=job["num_classes"]) if check.numel() else (0, 0))
    return state


# --------------------------------------------------------------------------- fan-out


def ablation_counts(
    cfg: StudyConfig,
    source: Source,
    split: Split,
    units: list[int],
    shared: Shared,
    *,
    out_dir: Path | None,
    num_shards: int | None = None,
    quiet: bool = False,
    fail_once_dir: Path | None = None,
) -> tuple[AblationCounts, FanOut]:
    """Per-unit ablation counts of ``split``, fanned out over unit chunks x data shards and merged."""
    identity = {"kind": "ablation", "version": 2, "checkpoint": source.fingerprint, "split": split.name,
                "indices": job_hash({"i": split.indices}), "layer": cfg.ablation.layer, "units": units,
                "data": cfg.dump()["data"], "dtype": cfg.ablation.dtype,
                "precision_sample": cfg.ablation.precision_sample}
    parts_dir = out_dir / "parts" / f"ablation-{split.name}-{job_hash(identity)}" if out_dir else None

    def make() -> dict:
        unit_chunks = chunks(units, cfg.ablation.unit_chunk)
        shards = num_shards or default_shards(split.num_images, len(unit_chunks), task_resources(cfg)[1])
        return {"chunks": unit_chunks, "shards": shard_bounds(split.num_images, shards)}

    grid = job_plan(parts_dir, identity, make)
    common = common_job(cfg, split)
    images, labels = shared.arrays[split.name]
    sample = precision_sample(cfg, split.num_images)
    jobs = {}
    for c, chunk in enumerate(grid["chunks"]):
        for s, (lo, hi) in enumerate(grid["shards"]):
            key = f"chunk{c:03d}-shard{s:03d}"
            marker = str(fail_once_dir / f"{parts_dir.name if parts_dir else split.name}-{key}") if fail_once_dir else None
            check = sample[(sample >= lo) & (sample < hi)] - lo  # positions within the shard
            jobs[key] = (shared.state, images, labels,
                         {**common, "units": chunk, "indices": shared.indices(split, lo, hi),
                          "precision_check": check, "fail_marker": marker})
    done = fan_out(cfg, ablation_task, jobs, parts_dir=parts_dir, desc=f"ablating {cfg.ablation.layer} ({split.name})",
                   quiet=quiet)
    counts = AblationCounts.merge(AblationCounts.from_state_dict(done.results[k]) for k in jobs)
    done.precision = (sum(int(done.results[k]["precision_pairs"]) for k in jobs),
                      sum(int(done.results[k]["precision_differ"]) for k in jobs))
    return counts, done


def precision_sample(cfg: StudyConfig, num_images: int) -> torch.Tensor:
    """Sorted positions of the images re-checked in float64 (``ablation.precision_sample``; none in float64)."""
    if cfg.ablation.dtype == "float64" or cfg.ablation.precision_sample == 0:
        return torch.zeros(0, dtype=torch.long)
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(cfg.data.seed))
    return perm[: cfg.ablation.precision_sample].sort().values


# --------------------------------------------------------------------------- outputs


def write_ablation_outputs(counts: AblationCounts, cfg: StudyConfig, out_dir: Path) -> tuple[list[Path], pd.DataFrame]:
    """ablation.parquet / .csv (tidy), units_ranked.csv, units_ranked_per_class.csv, two PNGs; and the tidy table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from trainables.datasets import dataset_spec

    names = dataset_spec(cfg.data.name).class_names()
    tidy = class_accuracy(counts, names)
    files = [out_dir / "ablation.parquet", out_dir / "ablation.csv", out_dir / "units_ranked.csv",
             out_dir / "units_ranked_per_class.csv"]
    tidy.to_parquet(files[0], index=False)
    tidy.to_csv(files[1], index=False)
    rank_units(counts).to_csv(files[2], index=False)
    rank_units_per_class(counts, cfg.ablation.top_k, names).to_csv(files[3], index=False)
    return files + ablation_figures(counts, out_dir, names), tidy


# --------------------------------------------------------------------------- study ablate


@dataclass
class AblationResult:
    counts: AblationCounts
    ranked: pd.DataFrame  # rank_units(counts)
    power: Power  # what the per-unit tests could detect (unit_power)
    class_power: pd.DataFrame  # the same per class (analysis.rankings.class_power)
    class_significant: int  # (unit, class) changes with q < ALPHA over the units of their class
    out_dir: Path
    files: list[Path]
    run_id: str
    source: Source
    fan_out: FanOut
    cfg: StudyConfig

    @property
    def baseline_accuracy(self) -> float:
        return float(self.ranked["baseline_accuracy"].iloc[0])


def ablate(
    cfg: StudyConfig,
    source: Source,
    *,
    out_dir: Path,
    num_shards: int | None = None,
    quiet: bool = False,
    fail_once_dir: Path | None = None,
) -> AblationResult:
    """Ablate every unit (or ``ablation.units``) of ``ablation.layer`` on the test split; write and log the results.

    ``fail_once_dir`` (tests): every task fails on its first attempt, leaving a
    marker file there, so Ray's retries must finish the job.
    """
    started = time.time()
    model = check_model(source, cfg)
    units = check_units(model, cfg.ablation.layer, cfg.ablation.units).tolist()
    split = report_split(cfg)
    init_ray(cfg)
    shared = put_shared(cfg, source, [split])
    counts, done = ablation_counts(cfg, source, split, units, shared, out_dir=out_dir, num_shards=num_shards,
                                   quiet=quiet, fail_once_dir=fail_once_dir)
    files, tidy = write_ablation_outputs(counts, cfg, out_dir)
    ranked = rank_units(counts)
    power, per_class = unit_power(counts, ranked), class_power(counts, tidy)
    baseline = float(counts.baseline_correct.sum()) / counts.num_images
    pairs, differ = done.precision
    # in points, 2 decimals: min = the largest drop (the most useful unit's removal), max = the largest gain (the
    # most harmful unit's removal); whether either is significant is for units_ranked.csv's q to say
    metrics = {"ablation/baseline_acc": baseline,
               "ablation/min_unit_change_pt": round(100 * float(ranked["change"].min()), 2),
               "ablation/max_unit_change_pt": round(100 * float(ranked["change"].max()), 2),
               "ablation/significant_units": int(ranked["significant"].sum()),
               "ablation/bh_level": power.level}
    # inf (not logged): no drop (gain) can be detected with fewer right (wrong) images than the test needs
    metrics.update({key: 100 * v for key, v in (("ablation/mde_pt", power.drop), ("ablation/mde_gain_pt", power.gain))
                    if v < float("inf")})
    if pairs:
        metrics.update({"ablation/precision_pairs_checked": pairs, "ablation/precision_pairs_differ": differ})
    run_id = log_analysis_run(
        cfg, source, kind="ablation", metrics=metrics,
        params={"ablation.num_units": len(units), "ablation.num_images": counts.num_images,
                "ablation.tasks": len(done.results)},
        files=files, started=started,
        summary=f"Each of the {len(units)} {cfg.ablation.layer} units removed in turn on {counts.num_images} test "
                f"images; ablation/min_unit_change_pt (max_unit_change_pt) is the largest drop (gain) against "
                f"ablation/baseline_acc (a fraction), in points; "
                f"units_ranked.csv has each unit's exact McNemar p and BH q; ablation/mde_pt (mde_gain_pt) is the "
                f"drop (gain) in points found with {power.power:.0%} power at BH level ablation/bh_level.",
    )
    class_significant = int(tidy["significant"].sum())
    return AblationResult(counts, ranked, power, per_class, class_significant, out_dir, files, run_id, source, done,
                          cfg)


def run_ablation(
    checkpoint: str,
    config_path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    units: str | None = None,
    out: Path | None = None,
    num_shards: int | None = None,
    quiet: bool = False,
) -> AblationResult:
    """``study ablate``: resolve, check, fan out, write, log."""
    with tempfile.TemporaryDirectory(prefix="unitstudy-ckpt-") as tmp:
        cfg, source = prepare(checkpoint, config_path, overrides, layer=layer, units=units, workdir=Path(tmp))
        out_dir = Path(anchor(out if out is not None else Path("outputs") / f"ablation-{source.name}"))
        return ablate(cfg, source, out_dir=out_dir, num_shards=num_shards, quiet=quiet)


def ablation_summary(result: AblationResult, n: int = 5) -> list[str]:
    """A few lines for the terminal: baseline, the significant units (or that there are none), the power of
    every null (overall and per class), where things went. No unit is named unless its q < ALPHA."""
    c, r, power = result.counts, result.ranked, result.power
    src = f", source run {result.source.run_id}" if result.source.run_id else ""
    useful = r[r["significant"] & (r["change"] < 0)]  # most negative change first (rank_units' order)
    harmful = r[r["significant"] & (r["change"] > 0)].assign(net=lambda d: d["gained"] - d["lost"])
    harmful = harmful.sort_values(["net", "p_value"], ascending=[False, True], kind="stable")
    lines = [
        f"{c.layer}: {c.units.numel()} units ablated one at a time on {c.num_images} test images, "
        f"{len(result.fan_out.results)} tasks ({len(result.fan_out.computed)} run now, "
        f"{len(result.fan_out.reused)} resumed)",
        f"baseline accuracy {result.baseline_accuracy:.2%} ({power.errors} errors); each change is tested against "
        f"it on the same images (exact McNemar test, Benjamini-Hochberg q over the {len(r)} units)",
    ]
    if len(useful) + len(harmful) == 0:
        lines.append(f"no unit's removal changes accuracy significantly (q < {ALPHA:g}); {detectable(power)}")
    else:
        lines += [
            f"significant at q < {ALPHA:g}: {len(useful)} unit(s) whose removal lowers accuracy (useful), "
            f"{len(harmful)} whose removal raises it (harmful)",
            f"useful units (removal lowers accuracy): {_unit_list(useful, n)}",
            f"harmful units (removal raises accuracy): {_unit_list(harmful, n)}",
            f"the other {len(r) - len(useful) - len(harmful)} units: no significant change; {detectable(power)}",
        ]
    lines.append(_class_line(result))
    pairs, differ = result.fan_out.precision
    if pairs:
        lines.append(f"float32 check: {differ} of {pairs} (unit, image) results differ from float64 on a sample "
                     f"of images" + ("" if not differ else "; use --set ablation.dtype=float64 for exact counts"))
    return lines + [
        f"outputs: {result.out_dir}/ ({', '.join(f.name for f in result.files)})",
        f"MLflow run {result.run_id} (kind=ablation{src})",
    ]


def detectable(power: Power) -> str:
    """``with 80% power the test detects a drop of 0.07 pt or a gain of 0.07 pt (BH level 0.00078)``."""
    gain = (f"a gain of {100 * power.gain:.2f} pt (~{power.gain * power.images:.0f} images)"
            if power.gain < float("inf") else f"no gain at all (only {power.errors} baseline errors)")
    return (f"with {power.power:.0%} power the test on these {power.images} images detects a drop of "
            f"{100 * power.drop:.2f} pt (~{power.drop * power.images:.0f} images) or {gain} "
            f"(at BH level {power.level:.2g})")


def _class_line(result: AblationResult) -> str:
    """Per class: how many (unit, class) changes are significant and the range of what the rest could show."""
    cp = result.class_power
    if cp.empty:
        return "per class: no class has images"
    pts = lambda s: (f"{100 * s.min():.1f}-{100 * s.max():.1f} pt" if s.min() < s.max()  # noqa: E731
                     else f"{100 * s.min():.1f} pt")
    finite = cp["mde_gain"][cp["mde_gain"] < float("inf")]
    gains = f"gains of {pts(finite)}" if len(finite) else "no gain"
    if 0 < len(finite) < len(cp):
        gains += f" ({len(cp) - len(finite)} classes: none)"
    lo, hi = int(cp["images"].min()), int(cp["images"].max())
    return (f"per class ({lo if lo == hi else f'{lo}-{hi}'} images each): {result.class_significant} "
            f"(unit, class) change(s) significant at q < {ALPHA:g}; otherwise detectable with {result.power.power:.0%} "
            f"power: drops of {pts(cp['mde_drop'])}, {gains} (units_ranked_per_class.csv)")


def _unit_list(rows: pd.DataFrame, n: int) -> str:
    """``48 (-1.20 pt, q 0.030), ...``: the first rows, never splitting a group of units tied in change and p."""
    if rows.empty:
        return "none"
    keys = list(zip(rows["gained"] - rows["lost"], rows["p_value"]))
    cut = min(n, len(rows))
    while 0 < cut < len(rows) and keys[cut - 1] == keys[cut]:
        cut -= 1  # the tie at the cut is left for the "more" count
    text = ", ".join(f"{int(r.unit)} ({r.change * 100:+.2f} pt, q {r.q_value:.3g})" for r in rows.iloc[:cut].itertuples())
    rest = len(rows) - cut
    return (text + (", " if text else "") + f"{rest} more in units_ranked.csv") if rest else text
