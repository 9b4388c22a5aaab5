"""``study intervene``: the paper's Table 1, with units selected on one split and reported on another.

Paper: PAPER.md section 2 items 2-3 (Kim, Samith, Utama Table 1). The
computation is :mod:`analysis.intervention`; this is its driver:

1. selection split = the validation images the checkpoint's training held out
   (:func:`study.fanout.validation_split`; never trained on, never the test
   set), report split = test;
2. per-unit ablation on the selection split (fanned out and resumable exactly
   like ``study ablate``) gives the worst-k units (removal raises accuracy most)
   and the best-k (removal lowers it most), k = ``ablation.top_k``, drawn only
   from units whose change on the selection images goes that way (never a
   zero-change unit; ties broken by evidence, never by id:
   :func:`analysis.rankings.select_units`); fewer than k is said, none skips its rows;
3. every intervention of :func:`analysis.intervention.table1_interventions`
   (output and weight, divided and multiplied by each of ``ablation.factors``)
   is evaluated on data shards of both splits as Ray tasks and the counts are
   summed; :func:`analysis.intervention.intervention_table` applies the paper's
   rule (stop raising the factor once accuracy falls below baseline) judged on
   the selection split;
   every row carries its exact McNemar p-value against the unmodified model on
   the same test images and its Benjamini-Hochberg q over the rows; rows with
   q >= 0.05 are marked not significant, and the table states the change its
   tests detect with 80% power (:func:`analysis.intervention.table1_power`);
4. Table 1 is printed (Markdown) and logged as CSV and Markdown to an MLflow run
   tagged ``kind=intervention``, linked to the checkpoint's run like ``study ablate``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from analysis.counts import AblationCounts
from analysis.hooks import check_units
from analysis.intervention import InterventionCounts, intervention_table, table1_interventions, table1_power
from analysis.rankings import ALPHA, Power, UnitSelection, best_units, rank_units, worst_units
from study.ablate import detectable
from study.ablate import ablation_counts
from study.analysis_runs import log_analysis_run
from study.config import StudyConfig
from study.fanout import (
    MIN_SHARD_IMAGES,
    FanOut,
    Shared,
    Split,
    common_job,
    eval_batches,
    fan_out,
    job_hash,
    job_plan,
    open_task,
    put_shared,
    report_split,
    shard_bounds,
    task_resources,
    validation_split,
)
from study.jobs import anchor
from study.runtime import init_ray
from study.sources import Source, check_model, prepare
from trainables.errors import ConfigError

__all__ = ["InterventionResult", "intervene", "markdown_table", "run_intervention", "table1_display"]


@dataclass
class InterventionResult:
    table: pd.DataFrame  # intervention_table(report, selection)
    selection_ablation: AblationCounts
    report: InterventionCounts
    selection: InterventionCounts
    worst: UnitSelection
    best: UnitSelection
    power: Power  # what the table's tests could detect on the test images (table1_power)
    out_dir: Path
    files: list[Path]
    run_id: str
    source: Source
    fan_outs: dict[str, FanOut]
    cfg: StudyConfig


def intervention_task(state_dict: dict, images, labels, job: dict) -> dict:
    """One data shard of every intervention in ``job["interventions"]``: the counts' ``state_dict()``.

    Inputs as for :func:`study.ablate.ablation_task`.
    """
    from analysis.intervention import Intervention, intervention_counts

    model, device = open_task(state_dict, job)
    dtype = torch.float64 if job["dtype"] == "float64" else torch.float32
    batches = eval_batches(job["data"], images, labels, job["train"], job["indices"], job["batch_size"], device)
    plan = [Intervention(**d) for d in job["interventions"]]
    return intervention_counts(model, job["layer"], batches, plan, device=device, num_classes=job["num_classes"],
                               dtype=dtype).state_dict()


def intervention_counts_fanned(
    cfg: StudyConfig,
    source: Source,
    split: Split,
    plan: list,
    shared: Shared,
    *,
    out_dir: Path | None,
    num_shards: int | None = None,
    quiet: bool = False,
) -> tuple[InterventionCounts, FanOut]:
    """:func:`analysis.intervention.intervention_counts` of ``plan`` on ``split``, over data shards, summed."""
    plan_dicts = [asdict(iv) for iv in plan]
    identity = {"kind": "intervention", "version": 2, "checkpoint": source.fingerprint, "split": split.name,
                "indices": job_hash({"i": split.indices}), "layer": cfg.ablation.layer, "plan": plan_dicts,
                "data": cfg.dump()["data"], "dtype": cfg.ablation.dtype}
    parts_dir = out_dir / "parts" / f"intervention-{split.name}-{job_hash(identity)}" if out_dir else None

    def make() -> dict:
        shards = num_shards or max(1, min(task_resources(cfg)[1], split.num_images // MIN_SHARD_IMAGES))
        return {"shards": shard_bounds(split.num_images, shards)}

    grid = job_plan(parts_dir, identity, make)
    common = common_job(cfg, split)
    images, labels = shared.arrays[split.name]
    jobs = {
        f"shard{s:03d}": (shared.state, images, labels,
                          {**common, "interventions": plan_dicts, "indices": shared.indices(split, lo, hi)})
        for s, (lo, hi) in enumerate(grid["shards"])
    }
    done = fan_out(cfg, intervention_task, jobs, parts_dir=parts_dir, desc=f"interventions ({split.name})",
                   quiet=quiet)
    parts = [InterventionCounts.from_state_dict(done.results[k]) for k in jobs]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total, done


def table1_display(table: pd.DataFrame, report: InterventionCounts, selection: InterventionCounts) -> pd.DataFrame:
    """Table 1 for people: a baseline row, then one row per intervention tried, accuracies in %."""
    pct = lambda v: f"{v * 100:.2f}%"  # noqa: E731
    rows = [{"units": "-", "intervention": "baseline (none)", "test acc": pct(report.baseline_accuracy), "change": "",
             "95% CI": "", "p": "", "q": "", "val acc": pct(selection.baseline_accuracy), "stop": ""}]
    for _, r in table.iterrows():
        sign = "/" if r["operation"] == "divide" else "x"
        rows.append({
            "units": r["units"],
            "intervention": f"{r['intervention']} {sign}{r['factor']:g}",
            "test acc": pct(r["accuracy"]),
            "change": f"{r['change'] * 100:+.2f} pt",
            "95% CI": f"[{r['ci_low'] * 100:+.2f}, {r['ci_high'] * 100:+.2f}]",
            "p": f"{r['p_value']:.3g}",
            "q": f"{r['q_value']:.3g}" + ("" if r["significant"] else " (n.s.)"),
            "val acc": pct(r["selection_accuracy"]),
            "stop": "below baseline" if r["below_baseline"] else "",
        })
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' ``to_markdown`` needs tabulate, which we do not depend on)."""
    cols = [str(c) for c in df.columns]
    cells = [[str(v) for v in row] for row in df.itertuples(index=False)]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells)])


def intervene(
    cfg: StudyConfig,
    source: Source,
    *,
    out_dir: Path,
    num_shards: int | None = None,
    quiet: bool = False,
) -> InterventionResult:
    """Select worst/best units on the validation images, evaluate Table 1 on both splits, write and log it."""
    started = time.time()
    model = check_model(source, cfg)
    layer, k = cfg.ablation.layer, cfg.ablation.top_k
    candidates = check_units(model, layer, cfg.ablation.units).tolist()
    if 2 * k > len(candidates):
        raise ConfigError(
            f"ablation.top_k = {k} needs {2 * k} units (worst and best) but '{layer}' offers {len(candidates)}; "
            "lower ablation.top_k"
        )
    if not cfg.ablation.factors or any(not f > 0 for f in cfg.ablation.factors):
        raise ConfigError(f"ablation.factors must be positive numbers, got {cfg.ablation.factors}")
    selection, report = validation_split(cfg), report_split(cfg)
    init_ray(cfg)
    shared = put_shared(cfg, source, [selection, report])
    fans: dict[str, FanOut] = {}
    ablation, fans["ablation"] = ablation_counts(cfg, source, selection, candidates, shared, out_dir=out_dir,
                                                 num_shards=num_shards, quiet=quiet)
    worst, best = worst_units(ablation, k), best_units(ablation, k)
    plan = table1_interventions(worst, best, factors=cfg.ablation.factors)
    counts = {}
    for split in (selection, report):
        counts[split.name], fans[split.name] = intervention_counts_fanned(
            cfg, source, split, plan, shared, out_dir=out_dir, num_shards=num_shards, quiet=quiet)
    table = intervention_table(counts["test"], counts["val"])
    power = table1_power(table, counts["test"])

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "table1.csv", out_dir / "table1.md", out_dir / "units_ranked_val.csv"]
    table.to_csv(files[0], index=False)
    notes = "\n".join(table1_notes(worst, best, table, power))
    files[1].write_text(
        f"# Table 1: {layer} interventions\n\n{table1_caption(selection.num_images, report.num_images, worst, best)}"
        f"\n\n{markdown_table(table1_display(table, counts['test'], counts['val']))}\n\n{notes}\n"
    )
    rank_units(ablation).to_csv(files[2], index=False)
    metrics = {"intervention/test_baseline_acc": counts["test"].baseline_accuracy,
               "intervention/val_baseline_acc": counts["val"].baseline_accuracy,
               "intervention/significant_rows": int(table["significant"].sum()),
               "intervention/bh_level": power.level}
    if len(table):
        metrics["intervention/max_test_change_pt"] = round(100 * float(table["change"].max()), 2)  # the best row
    metrics.update({key: 100 * v for key, v in (("intervention/mde_pt", power.drop),
                                                ("intervention/mde_gain_pt", power.gain)) if v < float("inf")})
    run_id = log_analysis_run(
        cfg, source, kind="intervention", metrics=metrics,
        params={"intervention.worst_units": " ".join(map(str, worst.units)) or "none",
                "intervention.best_units": " ".join(map(str, best.units)) or "none",
                "intervention.selection_images": selection.num_images,
                "intervention.report_images": report.num_images},
        files=files, started=started,
        summary=f"Table 1: the worst and best {k} {layer} units (only units whose removal moves validation accuracy "
                f"that way), selected on {selection.num_images} validation images, damped or boosted; test accuracy "
                f"on {report.num_images} test images (table1.md); intervention/mde_pt is the drop found with "
                f"{power.power:.0%} power at BH level intervention/bh_level.",
    )
    return InterventionResult(table, ablation, counts["test"], counts["val"], worst, best, power, out_dir, files,
                              run_id, source, fans, cfg)


def table1_caption(val_images: int, test_images: int, worst: UnitSelection, best: UnitSelection) -> str:
    chosen = "; ".join(f"{sel.label}: {' '.join(map(str, sel.units)) or 'none'}" for sel in (worst, best))
    return (f"Units selected on {val_images} validation images held out of training, only among units whose removal "
            f"moves validation accuracy the named way ({chosen}); accuracy reported on {test_images} test images. "
            f"n = {test_images} test images for every test column, {val_images} validation images for val acc. "
            f"units: the units intervened on (-: none, the baseline row); intervention: what was done to them, "
            f"/k divides and xk multiplies their output (unit activation) or their conv weights (weight "
            f"modification) by k; test acc: test accuracy with it; change: test acc minus the baseline's, in "
            f"percentage points (pt); 95% CI: paired (Agresti-Min) interval of the change, in points; p: exact "
            f"McNemar test of each row against the baseline on the same test images; q: Benjamini-Hochberg q-value "
            f"over the rows; (n.s.) = q >= {ALPHA:g}; val acc: validation accuracy with it (the images the units "
            f"and the stop were chosen on); stop: \"below baseline\" marks the row whose val acc fell below the "
            f"baseline's, which ends that series of factors (the paper's Table 1 protocol); an empty cell does not "
            f"apply to that row.")


def table1_notes(worst: UnitSelection, best: UnitSelection, table: pd.DataFrame, power: Power) -> list[str]:
    """What the selection left out (one line each) and the verdict line with the table's power."""
    lines = [note + ("" if sel.units else "; its rows are skipped")
             for sel in (worst, best) if (note := sel.shortfall())]
    significant = int(table["significant"].sum())
    if len(table) == 0:
        lines.append("no intervention was run: no unit's removal moves validation accuracy")
    elif significant == 0:
        lines.append(f"none of the {len(table)} interventions changes test accuracy significantly "
                     f"(q < {ALPHA:g}); {detectable(power)}")
    else:
        rest = "" if significant == len(table) else f"; for the rest, {detectable(power)}"
        lines.append(f"{significant} of {len(table)} interventions change test accuracy significantly "
                     f"(q < {ALPHA:g}){rest}")
    return lines


def _factors_option(factors: str | None) -> list[str]:
    if factors is None:
        return []
    try:
        values = [float(f) for f in factors.split(",") if f.strip()]
    except ValueError:
        raise ConfigError(f"--factors expects comma-separated numbers such as 2,3, got '{factors}'") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ConfigError(f"--factors must be positive numbers such as 2,3, got '{factors}'")
    return [f"ablation.factors={json.dumps(values)}"]


def run_intervention(
    checkpoint: str,
    config_path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    units: str | None = None,
    top_k: int | None = None,
    factors: str | None = None,
    out: Path | None = None,
    num_shards: int | None = None,
    quiet: bool = False,
) -> InterventionResult:
    """``study intervene``: resolve, check, select, intervene, write, log."""
    extra = _factors_option(factors) + ([f"ablation.top_k={top_k}"] if top_k is not None else [])
    with tempfile.TemporaryDirectory(prefix="unitstudy-ckpt-") as tmp:
        cfg, source = prepare(checkpoint, config_path, overrides, layer=layer, units=units, workdir=Path(tmp),
                              extra=extra)
        out_dir = Path(anchor(out if out is not None else Path("outputs") / f"intervention-{source.name}"))
        return intervene(cfg, source, out_dir=out_dir, num_shards=num_shards, quiet=quiet)


def intervention_summary(result: InterventionResult) -> list[str]:
    src = f", source run {result.source.run_id}" if result.source.run_id else ""
    return [
        markdown_table(table1_display(result.table, result.report, result.selection)),
        table1_caption(int(result.selection.total.sum()), int(result.report.total.sum()), result.worst, result.best),
        *table1_notes(result.worst, result.best, result.table, result.power),
        f"outputs: {result.out_dir}/ ({', '.join(f.name for f in result.files)})",
        f"MLflow run {result.run_id} (kind=intervention{src})",
    ]
