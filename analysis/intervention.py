"""Unit interventions: damp or boost chosen units, and the paper's Table 1 protocol.

Paper (PAPER.md section 2 items 2-3; Kim, Samith, Utama section 4.1, Table 1):
take the worst units (removal raises accuracy) or the best (removal lowers it
most) of conv5_3, then

* unit activation analysis: divide / multiply their *output* by 2, 3, ...;
* weight modification: divide / multiply their *conv weights* by 2, 3, ...;

increasing the factor in order and stopping once accuracy falls below the
baseline (the row that falls below is reported, as in Table 1).

What each intervention does here:

* ``target="output"``: a forward hook multiplies the units' activations after
  their ReLU (``relu5_3`` for ``conv5_3``) by ``scale`` (``1/factor`` to divide).
  A positive scale commutes with ReLU, so this equals scaling the pre-activation.
* ``target="weight"``: the units' rows of the conv weight (output channels) are
  multiplied by ``scale``; the bias too when ``bias=True``. Without BatchNorm,
  scaling weight *and* bias equals output scaling (ReLU is positively
  homogeneous), and scaling the weight alone is ``relu(s * W*x + b)`` - a
  different intervention, which is why the paper's two rows differ (the
  Places365 VGG-16 has no BatchNorm; we take the paper's "weights" to mean
  weights without bias, hence ``bias=False`` by default). With BatchNorm between
  conv and ReLU the weights are scaled and BN is left as it is: in eval mode BN
  applies its stored statistics, ``gamma * (s * W*x + b - mean) / sqrt(var) + beta``,
  so the scale does not cancel but is not an output scale either (the BN shift
  is not scaled); in training mode BN would renormalise it away. Read "weight
  modification" on a BN model as exactly that operation, nothing more.

Protocol, with our addition (PAPER.md): units are selected, and the stopping
rule is applied, on one set of batches (a held-out part of train), and accuracy
is reported on another (test). :func:`intervention_counts` evaluates every
(intervention, factor) in one pass over a data shard - the trunk below the
units' conv runs once per batch, only the rest runs per intervention - and its
counts add up over shards; :func:`intervention_table` then applies the stopping
rule, giving the same rows as trying the factors one after another.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import pandas as pd
import torch
from torch import nn

from analysis.ablation import ablate_units
from analysis.counts import AblationCounts
from analysis.evaluation import Batches, batches_on, check_model_classes, class_hits, prepared_model, resolve_device
from analysis.hooks import check_units, edit_layer, eval_mode, flat_children, scale_units, unit_conv, unit_layer
from analysis.rankings import ALPHA, Power, UnitSelection, best_units, power_of, worst_units
from analysis.stats import bh_qvalues, mcnemar_exact, paired_proportion_interval
from trainables.errors import ConfigError

__all__ = [
    "Intervention",
    "InterventionCounts",
    "apply_intervention",
    "intervention_counts",
    "intervention_table",
    "run_table1",
    "scale_unit_outputs",
    "scale_unit_weights",
    "scaled_unit_weights",
    "table1_interventions",
    "table1_power",
]


# --------------------------------------------------------------------------- the operations


def scale_unit_outputs(model: nn.Module, layer: str, units: Sequence[int], scale: float):
    """Context manager: multiply the activations of ``units`` of ``layer`` by ``scale`` (a forward hook)."""
    index = check_units(model, layer, units)
    return edit_layer(model, unit_layer(model, layer), scale_units(index, scale))


@contextmanager
def scale_unit_weights(
    model: nn.Module, layer: str, units: Sequence[int], scale: float, *, bias: bool = False
) -> Iterator[nn.Conv2d]:
    """Context manager: multiply the conv weights (and bias if ``bias``) of ``units`` by ``scale`` in place.

    The original values are copied back on exit, bit for bit. Yields the conv.
    """
    index = check_units(model, layer, units)
    _, conv = unit_conv(model, layer)
    i = index.to(conv.weight.device)
    with torch.no_grad():
        saved_w = conv.weight[i].clone()
        saved_b = conv.bias[i].clone() if bias and conv.bias is not None else None
        try:
            conv.weight[i] = saved_w * scale
            if saved_b is not None:
                conv.bias[i] = saved_b * scale
            yield conv
        finally:
            conv.weight[i] = saved_w
            if saved_b is not None:
                conv.bias[i] = saved_b


def scaled_unit_weights(
    model: nn.Module, layer: str, units: Sequence[int], scale: float, *, bias: bool = False
) -> nn.Module:
    """A copy of ``model`` whose ``units`` have conv weights (and bias if ``bias``) times ``scale``."""
    index = check_units(model, layer, units)
    out = copy.deepcopy(model)
    _, conv = unit_conv(out, layer)
    i = index.to(conv.weight.device)
    with torch.no_grad():
        conv.weight[i] *= scale
        if bias and conv.bias is not None:
            conv.bias[i] *= scale
    return out


@dataclass(frozen=True)
class Intervention:
    """One row of Table 1: scale some units' output or conv weights by ``factor``.

    Attributes:
        target: "output" (activations after the ReLU) or "weight" (the conv's weights).
        operation: "divide" or "multiply" by ``factor``; "remove" zeroes the units' output (ablates them
            together; target "output", factor unused).
        factor: > 0; the protocol tries 2, 3, ... in order.
        units: unit indices of the layer.
        selection: how the units were chosen, e.g. "worst-5", "best-5", "custom".
        bias: weight target only: scale the conv bias as well.
    """

    target: Literal["output", "weight"]
    operation: Literal["divide", "multiply", "remove"]
    factor: float
    units: tuple[int, ...]
    selection: str = "custom"
    bias: bool = False

    def __post_init__(self) -> None:
        if self.target not in ("output", "weight"):
            raise ConfigError(f"intervention target must be 'output' or 'weight', got '{self.target}'")
        if self.operation not in ("divide", "multiply", "remove"):
            raise ConfigError(f"intervention operation must be 'divide', 'multiply' or 'remove', "
                              f"got '{self.operation}'")
        if self.operation == "remove" and self.target != "output":
            raise ConfigError("removing units zeroes their output: use target 'output'")
        if not self.factor > 0:
            raise ConfigError(f"intervention factor must be > 0, got {self.factor}")
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))
        object.__setattr__(self, "factor", float(self.factor))

    @property
    def scale(self) -> float:
        if self.operation == "remove":
            return 0.0
        return 1.0 / self.factor if self.operation == "divide" else self.factor

    @property
    def kind(self) -> str:
        """"output", "weight" or "weight+bias"."""
        return "weight+bias" if self.target == "weight" and self.bias else self.target

    @property
    def name(self) -> str:
        if self.operation == "remove":
            return f"{self.selection} removed"
        sign = "/" if self.operation == "divide" else "x"
        return f"{self.selection} {self.kind} {sign}{self.factor:g}"


def apply_intervention(model: nn.Module, layer: str, intervention: Intervention):
    """Context manager applying ``intervention`` to ``layer``'s units; the model is restored on exit."""
    iv = intervention
    if iv.target == "output":
        return scale_unit_outputs(model, layer, iv.units, iv.scale)
    return scale_unit_weights(model, layer, iv.units, iv.scale, bias=iv.bias)


# --------------------------------------------------------------------------- counting


@dataclass
class InterventionCounts:
    """Per-class correct counts of each intervention on some images, plus the baseline; shards add up.

    Attributes:
        layer: the unit layer.
        interventions: what row i of ``correct`` is.
        correct: (N, K) int64 correct per class under intervention i.
        total: (K,) int64 images per class.
        baseline_correct: (K,) int64 correct without intervention.
        lost: (N, K) int64 images correct without intervention and wrong under
            intervention i (the discordant pairs with :attr:`gained`).
    """

    layer: str
    interventions: list[Intervention]
    correct: torch.Tensor
    total: torch.Tensor
    baseline_correct: torch.Tensor
    lost: torch.Tensor

    @property
    def gained(self) -> torch.Tensor:
        """(N, K) int64 images wrong without intervention and correct under intervention i."""
        return self.correct - self.baseline_correct + self.lost

    def __add__(self, other: InterventionCounts) -> InterventionCounts:
        if self.layer != other.layer or self.interventions != other.interventions:
            raise ConfigError("cannot add intervention counts of different layers or interventions")
        return InterventionCounts(
            self.layer,
            list(self.interventions),
            self.correct + other.correct,
            self.total + other.total,
            self.baseline_correct + other.baseline_correct,
            self.lost + other.lost,
        )

    @property
    def accuracy(self) -> torch.Tensor:
        """(N,) float64 overall accuracy under each intervention."""
        return self.correct.sum(1).double() / self.total.sum().double()

    @property
    def baseline_accuracy(self) -> float:
        return float(self.baseline_correct.sum()) / float(self.total.sum())

    def state_dict(self) -> dict:
        """Plain tensors, strings and dicts (Ray, ``torch.save`` with ``weights_only=True``)."""
        return {
            "layer": self.layer,
            "interventions": [asdict(iv) for iv in self.interventions],
            "correct": self.correct.clone(),
            "total": self.total.clone(),
            "baseline_correct": self.baseline_correct.clone(),
            "lost": self.lost.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> InterventionCounts:
        try:
            return cls(
                str(state["layer"]),
                [Intervention(**d) for d in state["interventions"]],
                torch.as_tensor(state["correct"]).long(),
                torch.as_tensor(state["total"]).long(),
                torch.as_tensor(state["baseline_correct"]).long(),
                torch.as_tensor(state["lost"]).long(),
            )
        except KeyError as exc:
            raise ConfigError(f"not an intervention state dict: it has no key {exc}") from None


def intervention_counts(
    model: nn.Module,
    layer: str,
    batches: Batches,
    interventions: Sequence[Intervention],
    *,
    device: str | torch.device,
    num_classes: int,
    dtype: torch.dtype | None = None,
) -> InterventionCounts:
    """Per-class correct counts of every intervention (and the baseline) in one pass over ``batches``.

    Per batch, the network up to the units' conv (or up to the unit layer when
    only outputs are scaled) runs once; the rest runs once per intervention.
    ``model`` is left unchanged (eval mode and no grad inside; a copy when
    ``device``/``dtype`` differ).
    """
    check_model_classes(model, num_classes)
    site = unit_layer(model, layer)
    for iv in interventions:
        check_units(model, layer, iv.units)
    work = prepared_model(model, device, dtype)
    names = [n for n, _ in flat_children(work)]
    if any(iv.target == "weight" for iv in interventions):
        split = names.index(unit_conv(work, layer)[0])
    else:
        split = names.index(site)
    below, above = work[:split], work[split:]
    dev = resolve_device(device)
    wdtype = next(work.parameters()).dtype
    correct = torch.zeros(len(interventions), num_classes, dtype=torch.long, device=dev)
    total = torch.zeros(num_classes, dtype=torch.long, device=dev)
    baseline = torch.zeros(num_classes, dtype=torch.long, device=dev)
    lost = torch.zeros(len(interventions), num_classes, dtype=torch.long, device=dev)
    with eval_mode(work), torch.no_grad():
        for x, y in batches_on(batches, dev, wdtype, num_classes):
            hidden = below(x)
            total += torch.bincount(y, minlength=num_classes)
            base_hit = above(hidden).argmax(1) == y
            baseline += class_hits(y, base_hit, num_classes)
            for row, iv in enumerate(interventions):
                with apply_intervention(work, layer, iv):
                    hit = above(hidden).argmax(1) == y
                correct[row] += class_hits(y, hit, num_classes)
                lost[row] += class_hits(y, base_hit & ~hit, num_classes)
    return InterventionCounts(layer, list(interventions), correct.cpu(), total.cpu(), baseline.cpu(), lost.cpu())


# --------------------------------------------------------------------------- Table 1


def table1_interventions(
    worst: UnitSelection | Sequence[int],
    best: UnitSelection | Sequence[int],
    *,
    factors: Sequence[float] = (2.0, 3.0),
    targets: Sequence[str] = ("output", "weight"),
    bias: bool = False,
) -> list[Intervention]:
    """Every (units, target, operation, factor) of the protocol, factors in the order given.

    ``worst``/``best``: a :class:`~analysis.rankings.UnitSelection` (labelled by the
    units it holds, e.g. "worst-2" when only 2 of 5 qualified) or plain unit ids;
    an empty selection contributes no rows.
    """
    out = []
    for direction, chosen in (("worst", worst), ("best", best)):
        units = chosen.units if isinstance(chosen, UnitSelection) else tuple(chosen)
        if not units:
            continue
        for target in targets:
            for operation in ("divide", "multiply"):
                for factor in factors:
                    out.append(Intervention(target, operation, factor, units, f"{direction}-{len(units)}", bias))
    return out


def intervention_table(report: InterventionCounts, selection: InterventionCounts | None = None) -> pd.DataFrame:
    """Table 1 as a tidy DataFrame, with the stopping rule applied.

    Within each series (same units, target, operation) rows follow the order of
    the interventions; a series stops after the first factor whose accuracy on
    the *selection* counts falls below the selection baseline (that row is kept).
    ``selection=None`` selects on the report counts themselves (the paper's way,
    which overfits the reported images).

    Columns: intervention ("output", "weight", "weight+bias"), units (e.g.
    "worst-5"), operation, factor, accuracy and baseline (report images),
    change, lost, gained, ci_low, ci_high (95% paired interval of the change),
    p_value (exact McNemar test against the baseline on the same report
    images), q_value (Benjamini-Hochberg over the rows of the table),
    significant (q < 0.05), selection_accuracy, selection_baseline,
    below_baseline (on the selection images; True ends the series), unit_ids.
    """
    selection = selection or report
    if selection.interventions != report.interventions or selection.layer != report.layer:
        raise ConfigError("selection and report counts must come from the same interventions and layer")
    acc, sel_acc = report.accuracy.tolist(), selection.accuracy.tolist()
    base, sel_base = report.baseline_accuracy, selection.baseline_accuracy
    lost, gained = report.lost.sum(1).numpy(), report.gained.sum(1).numpy()
    n = int(report.total.sum())
    p_values = mcnemar_exact(lost, gained)
    low, high = paired_proportion_interval(lost, gained, n)
    stopped: set[tuple] = set()
    rows = []
    for i, iv in enumerate(report.interventions):
        series = (iv.units, iv.selection, iv.target, iv.bias, iv.operation)
        if series in stopped:
            continue
        below = sel_acc[i] < sel_base
        if below:
            stopped.add(series)
        rows.append(
            {
                "intervention": iv.kind,
                "units": iv.selection,
                "operation": iv.operation,
                "factor": iv.factor,
                "accuracy": acc[i],
                "baseline": base,
                "change": acc[i] - base,
                "lost": int(lost[i]),
                "gained": int(gained[i]),
                "ci_low": float(low[i]),
                "ci_high": float(high[i]),
                "p_value": float(p_values[i]),
                "selection_accuracy": sel_acc[i],
                "selection_baseline": sel_base,
                "below_baseline": below,
                "unit_ids": " ".join(str(u) for u in iv.units),
            }
        )
    columns = ["intervention", "units", "operation", "factor", "accuracy", "baseline", "change", "lost", "gained",
               "ci_low", "ci_high", "p_value", "selection_accuracy", "selection_baseline", "below_baseline",
               "unit_ids"]
    table = pd.DataFrame(rows, columns=columns)
    table.insert(12, "q_value", bh_qvalues(table["p_value"].to_numpy(dtype=float)))
    table.insert(13, "significant", table["q_value"] < ALPHA)
    return table


def table1_power(table: pd.DataFrame, report: InterventionCounts) -> Power:
    """What Table 1's tests could detect on the report images (:class:`analysis.rankings.Power`)."""
    n = int(report.total.sum())
    return power_of(table["q_value"].to_numpy(dtype=float), n, n - int(report.baseline_correct.sum()))


def run_table1(
    model: nn.Module,
    layer: str,
    *,
    selection_batches: Batches,
    report_batches: Batches,
    device: str | torch.device,
    num_classes: int,
    k: int = 5,
    factors: Sequence[float] = (2.0, 3.0),
    targets: Sequence[str] = ("output", "weight"),
    bias: bool = False,
    ablation: AblationCounts | None = None,
    dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """The whole protocol on one machine: select on ``selection_batches``, report on ``report_batches``.

    ``ablation`` (per-unit ablation counts on the selection images) is computed
    when not given; ``selection_batches`` is then iterated twice, so pass a list
    or a re-iterable loader.
    """
    if ablation is None:
        ablation = ablate_units(model, layer, selection_batches, device=device, num_classes=num_classes, dtype=dtype)
    plan = table1_interventions(worst_units(ablation, k), best_units(ablation, k), factors=factors, targets=targets,
                                bias=bias)
    kw = dict(device=device, num_classes=num_classes, dtype=dtype)
    selected = intervention_counts(model, layer, selection_batches, plan, **kw)
    reported = intervention_counts(model, layer, report_batches, plan, **kw)
    return intervention_table(reported, selected)
