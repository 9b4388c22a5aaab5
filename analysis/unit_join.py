"""The join of a unit's dissection label with what removing it does (docs/dissection.md).

A label is a claim about where a unit fires; an ablation is a claim about what
the network needs it for. Neither implies the other (a "cross" unit may carry
the decision between squares and circles), so this module puts them side by
side, per unit and per group of units, on the test images:

* :func:`unit_effects`: for each unit, its label, IoU, q and flags beside the
  change in accuracy its single removal causes on the images whose class
  contains the label's concept and on all the others; each change with its exact
  McNemar p-value on those images and Benjamini-Hochberg q over the units.
* group ablation (after Bau et al. 2020, PNAS, and dissect's
  ``experiment/intervention_experiment.py``): :func:`group_plan` removes together
  (a) all detectors of one concept and (b) for the classes of that concept, the
  top N units by single-unit damage to those classes on the validation images
  (N = 1, 2, 4, ...); :func:`group_effects` tests each on the concept's classes
  and on the others (test images).

Which classes contain a concept comes from the dataset (the shapes classes are
shape x texture; :meth:`trainables.datasets.DatasetSpec.concept_classes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.counts import AblationCounts
from analysis.intervention import Intervention, InterventionCounts
from analysis.rankings import ALPHA
from analysis.stats import bh_qvalues, mcnemar_exact
from trainables.errors import ConfigError

__all__ = ["GROUP_COLUMNS", "group_class_effects", "group_effects", "group_plan", "headline", "top_damage",
           "unit_effects"]

Classes = Mapping[str, Sequence[int]]
GROUP_COLUMNS = ["group", "concept", "units", "n_units"] + [
    f"{side}_{c}" for side in ("in", "out") for c in ("images", "change_pt", "lost", "gained", "p", "q")]


def _inside(concept: str, concept_classes: Classes, num_classes: int) -> torch.Tensor:
    """(K,) bool: the classes whose images contain ``concept``."""
    inside = torch.zeros(num_classes, dtype=torch.bool)
    inside[list(concept_classes.get(concept, ()))] = True
    return inside


def _change(lost: torch.Tensor, gained: torch.Tensor, total: torch.Tensor, classes: torch.Tensor):
    """(change in points, lost, gained, images) summed over the classes ``classes`` (a bool mask)."""
    n = int(total[classes].sum())
    lo, ga = int(lost[..., classes].sum()), int(gained[..., classes].sum())
    return (100.0 * (ga - lo) / n if n else float("nan")), lo, ga, n


def _sides(lost: torch.Tensor, gained: torch.Tensor, total: torch.Tensor, inside: torch.Tensor) -> dict:
    """in_* (the classes ``inside``) and out_* (the others): images, change_pt, lost, gained, p (exact McNemar)."""
    out = {}
    for side, mask in (("in", inside), ("out", ~inside)):
        change, lo, ga, n = _change(lost, gained, total, mask)
        out.update({f"{side}_images": n, f"{side}_change_pt": change, f"{side}_lost": lo, f"{side}_gained": ga,
                    f"{side}_p": float(mcnemar_exact(lo, ga)) if n else float("nan")})
    return out


def unit_effects(units: pd.DataFrame, counts: AblationCounts, concept_classes: Classes) -> pd.DataFrame:
    """One row per unit of ``units`` (:func:`analysis.dissection.label_units`) that ``counts`` ablated:
    unit, label, category, iou, q_value, detector, positional, then for the label's classes (``in_*``) and the
    other classes (``out_*``): images, change_pt, lost, gained, p (exact McNemar) and q (BH over the units).
    A label whose concept defines no class has NaN ``in_*`` values."""
    if not set(counts.units.tolist()) <= set(units["unit"].tolist()):
        raise ConfigError("the ablation holds units the dissection did not label: join results of one layer")
    row_of = {int(u): i for i, u in enumerate(counts.units.tolist())}
    gained = counts.gained
    rows = []
    for r in units[units["unit"].isin(row_of)].itertuples(index=False):
        i = row_of[int(r.unit)]
        inside = _inside(r.label, concept_classes, counts.num_classes)
        rows.append({"unit": int(r.unit), "label": r.label, "category": r.category, "iou": r.iou,
                     "q_value": r.q_value, "detector": bool(r.detector), "positional": bool(r.positional),
                     **_sides(counts.lost[i], gained[i], counts.total, inside)})
    table = pd.DataFrame(rows)
    for side in ("in", "out"):
        table.insert(table.columns.get_loc(f"{side}_p") + 1, f"{side}_q", bh_qvalues(table[f"{side}_p"]))
    return table


def top_damage(counts: AblationCounts, classes: torch.Tensor, sizes: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """For each N in ``sizes``: the N units whose single removal damages the classes ``classes`` (bool mask) most
    on ``counts``' images (validation), damage = images lost - images gained there; only units that do damage,
    and only an N whose cut does not split a tie (no set is completed by unit id)."""
    damage = (counts.lost[:, classes].sum(1) - counts.gained[:, classes].sum(1)).tolist()
    order = sorted(((d, u) for d, u in zip(damage, counts.units.tolist()) if d > 0), key=lambda du: -du[0])
    out = {}
    for n in sizes:
        if n > len(order) or (n < len(order) and order[n - 1][0] == order[n][0]):
            continue
        out[n] = tuple(sorted(u for _, u in order[:n]))
    return out


def group_plan(units: pd.DataFrame, validation: AblationCounts, concept_classes: Classes,
               sizes: Sequence[int] = (1, 2, 4, 8, 16)) -> list[Intervention]:
    """Interventions that remove units together: for each concept with detectors whose concept defines
    classes, "detectors:<concept>" (all its detectors, positional ones included) and "top<N>:<concept>" (the
    N units most damaging to that concept's classes on the validation ablation ``validation``)."""
    plan: list[Intervention] = []
    detectors = units[units["detector"]]
    for concept, group in detectors.groupby("label", sort=True):
        if not concept_classes.get(concept):
            continue
        plan.append(Intervention("output", "remove", 1.0, tuple(sorted(group["unit"].tolist())),
                                 f"detectors:{concept}"))
        inside = _inside(concept, concept_classes, validation.num_classes)
        for n, chosen in top_damage(validation, inside, sizes).items():
            plan.append(Intervention("output", "remove", 1.0, chosen, f"top{n}:{concept}"))
    return plan


def group_effects(counts: InterventionCounts, concept_classes: Classes) -> pd.DataFrame:
    """One row per removal in ``counts`` (test images): group, concept, units, n_units, and for the concept's
    classes (``in_*``) and the others (``out_*``): images, change_pt, lost, gained, p, q (BH over all rows and
    both sides together)."""
    rows = []
    for i, iv in enumerate(counts.interventions):
        kind, concept = iv.selection.split(":", 1)
        inside = _inside(concept, concept_classes, counts.total.numel())
        rows.append({"group": kind, "concept": concept, "units": " ".join(map(str, iv.units)),
                     "n_units": len(iv.units), **_sides(counts.lost[i], counts.gained[i], counts.total, inside)})
    table = pd.DataFrame(rows, columns=[c for c in GROUP_COLUMNS if not c.endswith("_q")])
    q = bh_qvalues(np.concatenate([table["in_p"].to_numpy(float), table["out_p"].to_numpy(float)]))
    table["in_q"], table["out_q"] = q[: len(table)], q[len(table):]
    return table[GROUP_COLUMNS]


def group_class_effects(counts: InterventionCounts, concept_classes: Classes,
                        class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Per removal and per class (the PNAS table): group, concept, class, in_concept (the class contains the
    concept), images, change_pt, lost, gained, p (exact McNemar on that class's images), q (BH over every
    row)."""
    rows = []
    for i, iv in enumerate(counts.interventions):
        kind, concept = iv.selection.split(":", 1)
        inside = set(concept_classes.get(concept, ()))
        for k in range(counts.total.numel()):
            n, lo, ga = int(counts.total[k]), int(counts.lost[i, k]), int(counts.gained[i, k])
            rows.append({"group": kind, "concept": concept, "class": class_names[k] if class_names else k,
                         "in_concept": k in inside, "images": n,
                         "change_pt": 100.0 * (ga - lo) / n if n else float("nan"), "lost": lo, "gained": ga,
                         "p": float(mcnemar_exact(lo, ga)) if n else float("nan")})
    table = pd.DataFrame(rows, columns=["group", "concept", "class", "in_concept", "images", "change_pt", "lost",
                                        "gained", "p"])
    table["q"] = bh_qvalues(table["p"].to_numpy(float))
    return table


def _effect(change: float, q: float) -> str:
    verdict = "" if q < ALPHA else ", not significant"
    return f"{change:+.1f} pt (q = {q:.2g}{verdict})"


def headline(groups: pd.DataFrame, units: pd.DataFrame) -> str:
    """One line with the join's finding, whatever it is: the concept with the most detectors removed together,
    its classes against the others."""
    det = groups[groups["group"] == "detectors"]
    if det.empty:
        labelled = int(units["detector"].sum())
        return (f"join: {labelled} detector unit(s), none of a concept that defines classes: no group to remove"
                if labelled else "join: no unit beats its null as a detector, so no group to remove")
    top = det.sort_values(["n_units", "concept"], ascending=[False, True]).iloc[0]
    return (f"join: removing the {int(top['n_units'])} '{top['concept']}' detector(s) together: "
            f"{top['concept']} classes {_effect(top['in_change_pt'], top['in_q'])}, "
            f"other classes {_effect(top['out_change_pt'], top['out_q'])} ({int(top['in_images'])} and "
            f"{int(top['out_images'])} test images)")
