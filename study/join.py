"""The dissection's join with ablation (``study dissect --join``, and the quickstart): driver side.

The computation is :mod:`analysis.unit_join`; this module fans its ablations out
(:func:`study.ablate.ablation_counts` on the validation images to rank units by
the damage they do to a concept's classes, :func:`study.intervene.intervention_counts_fanned`
on the test images to remove groups together) and writes ``units_joined.csv``
and ``groups_joined.csv``, which :func:`study.dissect.dissect` logs with the
dissection run. Both analyses must be of one layer at one input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.counts import AblationCounts
from analysis.unit_join import GROUP_COLUMNS, group_class_effects, group_effects, group_plan, headline, unit_effects
from study.config import StudyConfig
from study.fanout import put_shared, report_split, validation_split
from study.sources import Source
from trainables.datasets import dataset_spec
from trainables.errors import ConfigError

__all__ = ["Join", "join_ablation"]


@dataclass
class Join:
    units: pd.DataFrame  # unit_effects(...)
    groups: pd.DataFrame  # group_effects(...), empty when no concept with detectors defines classes
    files: list[Path]
    metrics: dict[str, float]
    headline: str


def test_ablation(cfg: StudyConfig, source: Source, units: list[int], *, out_dir: Path, quiet: bool) -> AblationCounts:
    """Each unit of the dissected layer removed alone on the test images (what ``study ablate`` computes)."""
    from study.ablate import ablation_counts

    split = report_split(cfg)
    counts, _ = ablation_counts(cfg, source, split, units, put_shared(cfg, source, [split]), out_dir=out_dir,
                                quiet=quiet)
    return counts


def join_ablation(cfg: StudyConfig, source: Source, units: pd.DataFrame, ablation: AblationCounts, *,
                  layer: str, out_dir: Path, quiet: bool = False) -> Join:
    """Join the dissection's ``units`` with the single-unit ``ablation`` of the same layer, remove groups of
    units together, write the two tables to ``out_dir``."""
    if ablation.layer != layer:
        raise ConfigError(f"cannot join a dissection of {layer} with an ablation of {ablation.layer}: set "
                          f"ablation.layer={layer} so both analyse one layer")
    from study.ablate import ablation_counts
    from study.intervene import intervention_counts_fanned

    cfg = cfg.model_copy(update={"ablation": cfg.ablation.model_copy(update={"layer": layer})})
    classes = dataset_spec(cfg.data.name).concept_classes()
    table = unit_effects(units, ablation, classes)
    selection, report = validation_split(cfg), report_split(cfg)
    shared = put_shared(cfg, source, [selection, report])
    plan = []
    if classes and bool(units["detector"].any()):
        validation, _ = ablation_counts(cfg, source, selection, ablation.units.tolist(), shared, out_dir=out_dir,
                                        quiet=quiet)
        plan = group_plan(units, validation, classes)
    names = dataset_spec(cfg.data.name).class_names()
    if plan:
        removed, _ = intervention_counts_fanned(cfg, source, report, plan, shared, out_dir=out_dir, quiet=quiet)
        groups, per_class = group_effects(removed, classes), group_class_effects(removed, classes, names)
    else:
        groups, per_class = pd.DataFrame(columns=GROUP_COLUMNS), None
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "units_joined.csv", out_dir / "groups_joined.csv"]
    table.to_csv(files[0], index=False)
    groups.to_csv(files[1], index=False)
    if per_class is not None:
        files.append(out_dir / "groups_joined_per_class.csv")
        per_class.to_csv(files[-1], index=False)
    detectors = table[table["detector"]]
    metrics = {"dissection/join_detectors_significant_on_their_classes": float((detectors["in_q"] < 0.05).sum()),
               "dissection/join_detectors_significant_elsewhere": float((detectors["out_q"] < 0.05).sum())}
    det_groups = groups[groups["group"] == "detectors"]
    for r in det_groups.itertuples():
        for side in ("in", "out"):
            value = getattr(r, f"{side}_change_pt")
            if not math.isnan(value):
                metrics[f"dissection/join_remove_{r.concept}_detectors_{side}_classes_pt"] = float(value)
    return Join(table, groups, files, metrics, headline(groups, units))

