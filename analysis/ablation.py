"""Per-unit ablation: per-class accuracy of the network with each unit removed.

Paper (PAPER.md section 2 item 1; Kim, Samith, Utama section 3.1, after Bau et
al. 2020 "Understanding the role of individual units"): for every unit u of
conv5_3, set its activation to zero (after its ReLU) and measure the accuracy of
each class; compare with the unablated per-class accuracy. Units whose removal
raises accuracy are "bad", those whose removal lowers it most are "good".

The hot path (DESIGN.md "The per-unit ablation"). The naive loop, kept as
:func:`ablate_units_naive` for tests and benchmarks, runs the whole network once
per unit. :func:`ablate_units` instead

1. runs the trunk once per batch up to the ablated layer (eval mode, no grad)
   and keeps its activations ``acts`` (B, C, H, W);
2. pushes all ablations through the rest of the network as one batched tensor
   whose rows are (unit, image) pairs - the unit index is a batch dimension -
   chunked to ``chunk`` rows;
3. exploits the layers right after the ablated one when it can: channel-separable
   maps that keep zeros zero (ReLU, max/avg/adaptive pools, eval dropout) turn
   "channel u zeroed" into "channel u of their output zeroed", so they run once;
   if a ``Flatten`` and a ``Linear`` follow (pool5 -> fc6 in VGG-16), ablating u
   subtracts ``W[:, cols(u)] @ p[cols(u)]`` from that layer's pre-activation
   ``z`` (a rank-``|cols(u)|`` update; rank 1 for the cifar variant, whose pool5
   is 1x1; 49 columns for places365's 7x7 average pool) instead of recomputing
   ``W @ p``. Only the layers after it (relu6 ... fc8) run per (unit, image) pair.
   Otherwise (e.g. conv4_3, followed by pool4 -> conv5_1) every pair runs the
   rest of the network from the ablated layer on;
4. skips pairs whose ablation changes nothing: when unit u is already zero
   everywhere for image b (after the separable maps), the ablated prediction is
   the baseline prediction, bit for bit. A unit chunk with fewer than
   ``_DENSE_SHARE`` live pairs gathers the live rows before the rest of the
   network; a denser one runs all rows (cheaper than the gather) and keeps the
   baseline result for the dead ones.

:func:`ablate_unit_set` zeroes several units together by the same machinery
(their joint contribution subtracted from fc6, or the generic path).

Exactness: the fast path computes the same function as the naive loop but in a
different order of floating-point additions (``z - W_u p_u`` against
``W p'``), so logits differ in the last bits and a near-tie between the top two
classes can flip an argmax. Run in float64 (``dtype=torch.float64``) where
counts must equal the naive loop's, as the tests do; in float32 (and with TF32
convolutions on GPUs) such disagreements are rare near-ties.

Results are mergeable (after dissect's ``tally.py``): :class:`AblationCounts`
holds integer counts, so shards over data add up (``a + b``) and chunks over
units concatenate (:meth:`AblationCounts.concat`); :meth:`AblationCounts.merge`
does both for a grid of (unit chunk, data shard) results, and ``state_dict`` /
``from_state_dict`` carry it as plain tensors (Ray, ``torch.save`` with
``weights_only=True``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.hooks import check_units, edit_layer, eval_mode, flat_children, num_units, unit_layer, zero_units
from analysis.stats import bh_qvalues, mcnemar_exact, paired_proportion_interval
from trainables.errors import CheckpointError, ConfigError, DataError
from trainables.models import convert_state_dict, infer_architecture, load_vgg16_state_dict, vgg16

__all__ = [
    "ALPHA",
    "AblationCounts",
    "ClassCounts",
    "ablate_unit_set",
    "ablate_units",
    "ablate_units_naive",
    "best_units",
    "class_accuracy",
    "evaluate",
    "model_from_state_dict",
    "precision_differences",
    "rank_units",
    "rank_units_per_class",
    "unit_accuracy",
    "worst_units",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
ALPHA = 0.05  # a change is "significant" when its Benjamini-Hochberg q-value is below this
Units = Sequence[int] | torch.Tensor | None

# Modules that act on each channel separately and map an all-zero channel to an
# all-zero channel (in eval mode), so ablating before them = ablating after them.
_SEPARABLE = (
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
# Elements per activation tensor when ``chunk`` is None: 2**22 (16 MiB in float32). Small
# enough for the CPU allocator to reuse freed blocks (no page faults per chunk), large
# enough for efficient matrix products (8192 rows of a 512-wide head, 1024 of a 4096-wide one).
_AUTO_CHUNK_ELEMENTS = 2**22
# Below this share of live (unit, image) pairs in a chunk, gather the live ones before the
# rest of the network; above it, run all pairs (a gather costs about a third of a head row).
_DENSE_SHARE = 0.75


# --------------------------------------------------------------------------- results


def _check_same(what: str, a, b) -> None:
    if isinstance(a, torch.Tensor):
        same = a.shape == b.shape and torch.equal(a, b)
    else:
        same = a == b
    if not same:
        raise ConfigError(f"cannot merge ablation results with different {what}")


@dataclass
class ClassCounts:
    """Correct predictions and images per class over some images; shards add up.

    Attributes:
        correct: (K,) int64 correctly classified images of each class.
        total: (K,) int64 images of each class.
    """

    correct: torch.Tensor
    total: torch.Tensor

    @classmethod
    def zeros(cls, num_classes: int) -> ClassCounts:
        return cls(torch.zeros(num_classes, dtype=torch.long), torch.zeros(num_classes, dtype=torch.long))

    def __add__(self, other: ClassCounts) -> ClassCounts:
        _check_same("class counts", self.total.shape, other.total.shape)
        return ClassCounts(self.correct + other.correct, self.total + other.total)

    @property
    def accuracy(self) -> float:
        """Overall accuracy (correct / images, i.e. weighted by class size); NaN without images."""
        n = int(self.total.sum())
        return float(self.correct.sum()) / n if n else float("nan")

    @property
    def class_acc(self) -> torch.Tensor:
        """(K,) float64 per-class accuracy; NaN for classes without images."""
        return self.correct.double() / self.total.double()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"correct": self.correct.clone(), "total": self.total.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> ClassCounts:
        return cls(torch.as_tensor(state["correct"]).long(), torch.as_tensor(state["total"]).long())


@dataclass
class AblationCounts:
    """Per-unit, per-class correct counts of single-unit ablations, plus the baseline.

    Attributes:
        layer: the unit layer as requested (``conv5_3`` = after relu5_3).
        units: (U,) int64 unit indices, one per row of ``correct``.
        correct: (U, K) int64; ``correct[i, k]`` = images of class k classified
            correctly with unit ``units[i]`` set to zero.
        total: (K,) int64 images of class k (the same images for every unit).
        baseline_correct: (K,) int64 correct with no unit ablated.
        lost: (U, K) int64 images of class k correct without ablation and wrong
            with unit ``units[i]`` removed; with :attr:`gained` (wrong -> correct)
            these are the discordant pairs of a paired test on the same images
            (McNemar, :func:`analysis.stats.mcnemar_exact`).
    """

    layer: str
    units: torch.Tensor
    correct: torch.Tensor
    total: torch.Tensor
    baseline_correct: torch.Tensor
    lost: torch.Tensor

    def __post_init__(self) -> None:
        u, k = self.units.numel(), self.total.numel()
        if (self.units.dim() != 1 or self.correct.shape != (u, k) or self.baseline_correct.shape != (k,)
                or self.lost.shape != (u, k)):
            raise ConfigError(
                f"inconsistent ablation counts: units {tuple(self.units.shape)}, correct "
                f"{tuple(self.correct.shape)}, total {tuple(self.total.shape)}, baseline "
                f"{tuple(self.baseline_correct.shape)}, lost {tuple(self.lost.shape)}"
            )
        gained = self.gained
        if bool((self.lost < 0).any() or (self.lost > self.baseline_correct).any() or (gained < 0).any()
                or (gained > self.total - self.baseline_correct).any()):
            raise ConfigError("inconsistent ablation counts: lost/gained images do not fit the correct counts")

    @property
    def gained(self) -> torch.Tensor:
        """(U, K) int64 images wrong without ablation and correct with the unit removed."""
        return self.correct - self.baseline_correct + self.lost

    @property
    def num_classes(self) -> int:
        return self.total.numel()

    @property
    def num_images(self) -> int:
        return int(self.total.sum())

    @property
    def accuracy(self) -> torch.Tensor:
        """(U, K) float64 per-class accuracy with each unit ablated (NaN for empty classes)."""
        return self.correct.double() / self.total.double()

    @property
    def baseline_accuracy(self) -> torch.Tensor:
        """(K,) float64 per-class accuracy of the unablated network."""
        return self.baseline_correct.double() / self.total.double()

    @property
    def baseline(self) -> ClassCounts:
        return ClassCounts(self.baseline_correct, self.total)

    def __add__(self, other: AblationCounts) -> AblationCounts:
        """Sum of two shards over disjoint data for the same units."""
        _check_same("layers", self.layer, other.layer)
        _check_same("units (sum data shards of the same unit chunk)", self.units, other.units)
        _check_same("class counts", self.total.shape, other.total.shape)
        return AblationCounts(
            self.layer,
            self.units.clone(),
            self.correct + other.correct,
            self.total + other.total,
            self.baseline_correct + other.baseline_correct,
            self.lost + other.lost,
        )

    @classmethod
    def concat(cls, parts: Sequence[AblationCounts]) -> AblationCounts:
        """Join chunks over disjoint units computed on the same data; rows sorted by unit."""
        if not parts:
            raise ConfigError("nothing to concatenate: no ablation results given")
        first = parts[0]
        for p in parts[1:]:
            _check_same("layers", first.layer, p.layer)
            _check_same("data (unit chunks must cover the same images)", first.total, p.total)
            _check_same("baselines (unit chunks must use the same model and images)", first.baseline_correct,
                        p.baseline_correct)
        units = torch.cat([p.units for p in parts])
        if units.unique().numel() != units.numel():
            raise ConfigError("cannot concatenate ablation results whose unit chunks overlap")
        order = units.argsort()
        correct = torch.cat([p.correct for p in parts])[order]
        lost = torch.cat([p.lost for p in parts])[order]
        return cls(first.layer, units[order], correct, first.total.clone(), first.baseline_correct.clone(), lost)

    @classmethod
    def merge(cls, parts: Iterable[AblationCounts]) -> AblationCounts:
        """Reduce a grid of results: sum the data shards of each unit chunk, then join the chunks.

        Every unit chunk must have been run on the same set of data shards
        (checked: the chunks' summed totals and baselines must agree).
        """
        by_units: dict[tuple[int, ...], AblationCounts] = {}
        for p in parts:
            key = tuple(p.units.tolist())
            by_units[key] = by_units[key] + p if key in by_units else p
        return cls.concat(list(by_units.values()))

    def select(self, units: Sequence[int]) -> AblationCounts:
        """The rows of ``units`` (in that order)."""
        row = {int(u): i for i, u in enumerate(self.units.tolist())}
        missing = [u for u in units if int(u) not in row]
        if missing:
            raise ConfigError(f"unit {missing[0]} is not in these ablation results")
        index = torch.tensor([row[int(u)] for u in units], dtype=torch.long)
        return AblationCounts(self.layer, self.units[index], self.correct[index], self.total.clone(),
                              self.baseline_correct.clone(), self.lost[index])

    def state_dict(self) -> dict:
        """Plain tensors and a string: ships through Ray, saves under ``weights_only=True``."""
        return {
            "layer": self.layer,
            "units": self.units.clone(),
            "correct": self.correct.clone(),
            "total": self.total.clone(),
            "baseline_correct": self.baseline_correct.clone(),
            "lost": self.lost.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> AblationCounts:
        try:
            return cls(
                str(state["layer"]),
                torch.as_tensor(state["units"]).long(),
                torch.as_tensor(state["correct"]).long(),
                torch.as_tensor(state["total"]).long(),
                torch.as_tensor(state["baseline_correct"]).long(),
                torch.as_tensor(state["lost"]).long(),
            )
        except KeyError as exc:
            raise ConfigError(f"not an ablation state dict: it has no key {exc}") from None


# --------------------------------------------------------------------------- plumbing


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _prepared(model: nn.Module, device: str | torch.device, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself if it already lives on ``device`` in ``dtype``; else a moved copy (caller's model untouched)."""
    device = _resolve_device(device)
    param = next(model.parameters())
    dtype = dtype or param.dtype
    if param.device == device and all(p.dtype == dtype for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def _batches_on(batches: Batches, device: torch.device, dtype: torch.dtype, num_classes: int) -> Iterator:
    """(images, labels) moved to ``device``; images cast to ``dtype``; labels checked against ``num_classes``."""
    for x, y in batches:
        x = x.to(device=device, dtype=dtype, non_blocking=True)
        y = torch.as_tensor(y).to(device=device, dtype=torch.long, non_blocking=True)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(
                f"a label ({int(y.min())}..{int(y.max())}) is outside 0..{num_classes - 1}; "
                "is num_classes right for this dataset?"
            )
        yield x, y


def _class_hits(y: torch.Tensor, hit: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) number of ``hit`` images per class ``y``."""
    return torch.zeros(num_classes, dtype=torch.long, device=y.device).index_add_(0, y, hit.long())


def _check_model_classes(model: nn.Module, num_classes: int) -> None:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if last and last[-1].out_features != num_classes:
        raise ConfigError(
            f"the model has {last[-1].out_features} outputs but num_classes is {num_classes}; "
            "use the checkpoint's class count"
        )


@dataclass
class _Plan:
    """How the network splits around the ablated layer (see the module docstring, step 3)."""

    trunk: nn.Sequential  # input -> acts (up to and including the ablated module)
    separable: nn.Sequential  # channel-separable, zero-preserving maps after it (run once)
    flatten: bool  # a Flatten(1) sits between them and ``linear``
    linear: nn.Linear | None  # low-rank-updated layer; None: generic path
    tail: nn.Sequential  # after ``linear`` (fast path) or after the ablated module (generic)


def _plan(model: nn.Sequential, site: str) -> _Plan:
    children = flat_children(model)
    names = [n for n, _ in children]
    i = names.index(site) + 1
    j = i
    while j < len(children) and isinstance(children[j][1], _SEPARABLE):
        j += 1
    k = j
    flatten = (
        k < len(children)
        and isinstance(children[k][1], nn.Flatten)
        and children[k][1].start_dim == 1
        and children[k][1].end_dim == -1
    )
    k += int(flatten)
    if k < len(children) and isinstance(children[k][1], nn.Linear):
        return _Plan(model[:i], model[i:j], flatten, children[k][1], model[k + 1 :])
    return _Plan(model[:i], nn.Sequential(), False, None, model[i:])


def _run_tail(tail: nn.Sequential, h: torch.Tensor, owned: bool) -> torch.Tensor:
    """``tail(h)`` in eval mode, with ReLU applied in place on tensors created here.

    ``owned`` says ``h`` is a temporary nobody else holds; outputs of Linear,
    Conv2d and BatchNorm2d are new tensors, so they are owned too. Eval-mode Dropout and Identity
    are skipped. Modules with hooks run normally.
    """
    for module in tail:
        plain = not (module._forward_hooks or module._forward_pre_hooks)
        if plain and owned and isinstance(module, nn.ReLU):
            h = h.clamp_(min=0)
        elif plain and not module.training and isinstance(module, (nn.Dropout, nn.Dropout2d, nn.Identity)):
            continue
        else:
            h = module(h)
            owned = isinstance(module, (nn.Linear, nn.Conv2d, nn.BatchNorm2d))
    return h


def _chunks(rows_per_unit: torch.Tensor, limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges [g0, g1) with at most ``limit`` pairs each (at least one row each)."""
    g, n = 0, rows_per_unit.numel()
    counts = rows_per_unit.tolist()
    while g < n:
        g1, rows = g, 0
        while g1 < n and (g1 == g or rows + counts[g1] <= limit):
            rows += counts[g1]
            g1 += 1
        yield g, g1
        g = g1


def _ablation_pass(
    model: nn.Sequential,
    site: str,
    batches: Batches,
    masks: torch.Tensor,
    *,
    device: torch.device,
    num_classes: int,
    chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correct (G, K) with each row of ``masks`` (G, C) bool zeroed jointly; totals (K,); baseline (K,); lost (G, K).

    ``lost[g, k]``: images of class k the baseline gets right and row g's ablation gets wrong.

    ``model`` is in eval mode on ``device`` already. Rows of ``masks`` are unit
    sets; when every row is a single unit the low-rank update applies.
    """
    plan = _plan(model, site)
    dtype = next(model.parameters()).dtype
    g_count, c = masks.shape
    masks = masks.to(device)
    singles = bool((masks.sum(1) == 1).all())
    unit_of_row = masks.long().argmax(1)  # (G,) meaningful when singles
    correct = torch.zeros(g_count, num_classes, dtype=torch.long, device=device)
    total = torch.zeros(num_classes, dtype=torch.long, device=device)
    baseline = torch.zeros(num_classes, dtype=torch.long, device=device)
    lost = torch.zeros(g_count, num_classes, dtype=torch.long, device=device)
    weight_t = None

    for x, y in _batches_on(batches, device, dtype, num_classes):
        b = x.shape[0]
        acts = plan.trunk(x)  # (B, C, ...)
        if acts.shape[1] != c:
            raise ConfigError(f"'{site}' has {acts.shape[1]} channels, but {c} units were expected")
        fast = plan.linear is not None
        if fast:
            p = plan.separable(acts)  # (B, C, ...): channel u is zero here iff ablated before
            fast = plan.flatten or p.dim() == 2
        if fast:
            p3 = p.reshape(b, c, -1)  # (B, C, S); fc columns of unit u: u*S .. u*S+S-1
            s = p3.shape[2]
            z = plan.linear(p3.reshape(b, c * s))  # (B, H) pre-activation
            h = z.shape[1]
            base_logits = _run_tail(plan.tail, z, owned=False)
            live_units = p3.ne(0).any(-1)  # (B, C)
            weight = plan.linear.weight  # (H, C*S)
            if weight_t is None:
                weight_t = weight.T.reshape(c, s, h).contiguous()  # (C, S, H): unit u's columns, transposed
            row_elems = h
        else:
            base_logits = _run_tail(plan.tail, acts, owned=False)
            live_units = acts.reshape(b, c, -1).ne(0).any(-1)  # (B, C)
            row_elems = acts[0].numel()
        base_hit = base_logits.argmax(1) == y  # (B,)
        if singles:
            live = live_units[:, unit_of_row].T  # (G, B): the unit is nonzero for the image
        else:
            live = (masks.double() @ live_units.double().T) > 0  # (G, B): the set touches a live channel
        # hits[g, b]: image b classified correctly with row g ablated; the baseline where g is dead.
        hits = base_hit.expand(g_count, b).clone()
        limit = chunk or max(256, _AUTO_CHUNK_ELEMENTS // row_elems)

        if fast and singles:
            # Per unit chunk, every (u, b): z - W[:, cols(u)] @ p[b, u, :], a rank-S update of z.
            gc = max(1, limit // b)
            for g0 in range(0, g_count, gc):
                u = unit_of_row[g0 : g0 + gc]  # (Gc,)
                chunk_live = live[g0 : g0 + gc]  # (Gc, B)
                n_live = int(chunk_live.sum())
                if n_live == 0:
                    continue
                pu = p3[:, u, :].transpose(0, 1)  # (Gc, B, S)
                zc = torch.baddbmm(z, pu, weight_t[u], alpha=-1)  # (Gc, B, H)
                if n_live < _DENSE_SHARE * chunk_live.numel():  # compact: only the live pairs
                    g_local, b_i = chunk_live.nonzero(as_tuple=True)
                    rows = zc.reshape(-1, h).index_select(0, g_local * b + b_i)
                    hits[g0 + g_local, b_i] = _run_tail(plan.tail, rows, owned=True).argmax(1) == y[b_i]
                else:  # all pairs; the dead ones keep their baseline hit
                    pred = _run_tail(plan.tail, zc.reshape(-1, h), owned=True).argmax(1).reshape(len(u), b)
                    hits[g0 : g0 + gc] = torch.where(chunk_live, pred == y, hits[g0 : g0 + gc])
        else:
            for g0, g1 in _chunks(live.sum(1).cpu(), limit):  # compact: live pairs only
                g_local, b_i = live[g0:g1].nonzero(as_tuple=True)  # (P,), (P,)
                if g_local.numel() == 0:
                    continue
                g_i = g0 + g_local
                if fast:  # a unit set: subtract its channels' contribution to the linear layer
                    removed = p3[b_i] * masks[g_i].unsqueeze(-1)  # (P, C, S)
                    zp = z[b_i] - removed.reshape(len(b_i), c * s) @ weight.T
                else:
                    keep_shape = (len(b_i), c) + (1,) * (acts.dim() - 2)
                    zp = acts[b_i].masked_fill(masks[g_i].reshape(keep_shape), 0)
                hits[g_i, b_i] = _run_tail(plan.tail, zp, owned=True).argmax(1) == y[b_i]

        one_hot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64)  # (B, K)
        correct += (hits.to(torch.float64) @ one_hot).round_().long()  # exact: integer sums <= B
        lost += ((base_hit & ~hits).to(torch.float64) @ one_hot).round_().long()
        total += torch.bincount(y, minlength=num_classes)
        baseline += _class_hits(y, base_hit, num_classes)
    return correct.cpu(), total.cpu(), baseline.cpu(), lost.cpu()


# --------------------------------------------------------------------------- public API


def model_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device,
    **expected: object,
) -> nn.Sequential:
    """The VGG-16 a state dict belongs to, built and loaded strictly, on ``device``, in eval mode.

    For a Ray task that receives the checkpoint's state dict (``ray.put`` once).
    Accepts a checkpoint dict (``{"model": ...}``) and the key spellings of
    :func:`trainables.models.convert_state_dict`. ``expected`` (any of variant,
    batch_norm, width, num_classes) is checked against what the weights say: a
    checkpoint of another architecture or class count is one CheckpointError.
    """
    unknown = set(expected) - {"variant", "batch_norm", "width", "num_classes"}
    if unknown:
        raise ConfigError(f"unknown architecture field(s) {sorted(unknown)}")
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
    batch_norm = any(k.endswith("running_mean") for k in state_dict)
    arch = infer_architecture(convert_state_dict(state_dict, batch_norm))
    for key, want in expected.items():
        if want is not None and arch[key] != want:
            raise CheckpointError(
                f"the checkpoint is a VGG-16 with {key}={arch[key]}, but {key}={want} was expected "
                "(a checkpoint of another model or dataset?)"
            )
    model = vgg16(arch["variant"], batch_norm=arch["batch_norm"], width=arch["width"],
                  num_classes=arch["num_classes"])
    load_vgg16_state_dict(model, state_dict)
    return model.to(device).eval()


def ablate_units(
    model: nn.Module,
    layer: str,
    batches: Batches,
    units: Units = None,
    *,
    device: str | torch.device,
    num_classes: int,
    chunk: int | None = None,
    dtype: torch.dtype | None = None,
) -> AblationCounts:
    """Per-class correct counts with each unit of ``layer`` zeroed in turn (the fast path).

    Args:
        model: the flat named VGG-16 (``trainables.models.vgg16``); left unchanged
            (run in eval mode and no grad, a copy when ``device``/``dtype`` differ).
        layer: unit layer: a conv name means its units after their ReLU
            (``conv5_3`` -> relu5_3, ``conv4_3`` -> relu4_3); any other layer
            name is taken literally (``relu5_3``, ``bn5_3``, ``pool5``, ``pool4``, ``relu6``).
        batches: iterable of (images, labels); labels in ``0..num_classes-1``.
            Iterated once. A data shard is just a subset of the batches.
        units: unit indices to ablate, each alone (default: all of them).
        device: where to compute.
        num_classes: K, the number of classes (the model's output size).
        chunk: (unit, image) rows pushed through the rest of the network at
            once; None sizes it to about 16 MiB per activation tensor.
        dtype: compute dtype (``torch.float64`` where the counts must equal
            :func:`ablate_units_naive`'s even on near-ties); default: the model's.
    """
    _check_model_classes(model, num_classes)
    site = unit_layer(model, layer)
    index = check_units(model, layer, units)
    work = _prepared(model, device, dtype)
    masks = torch.zeros(index.numel(), num_units(work, layer), dtype=torch.bool)
    masks[torch.arange(index.numel()), index] = True
    with eval_mode(work), torch.no_grad():
        correct, total, baseline, lost = _ablation_pass(
            work, site, batches, masks, device=_resolve_device(device), num_classes=num_classes, chunk=chunk
        )
    return AblationCounts(layer, index, correct, total, baseline, lost)


def ablate_unit_set(
    model: nn.Module,
    layer: str,
    batches: Batches,
    units: Units,
    *,
    device: str | torch.device,
    num_classes: int,
    chunk: int | None = None,
    dtype: torch.dtype | None = None,
) -> ClassCounts:
    """Per-class correct counts with all of ``units`` zeroed together (same fast machinery)."""
    _check_model_classes(model, num_classes)
    site = unit_layer(model, layer)
    index = check_units(model, layer, units)
    work = _prepared(model, device, dtype)
    masks = torch.zeros(1, num_units(work, layer), dtype=torch.bool)
    masks[0, index] = True
    with eval_mode(work), torch.no_grad():
        correct, total, _, _ = _ablation_pass(
            work, site, batches, masks, device=_resolve_device(device), num_classes=num_classes, chunk=chunk
        )
    return ClassCounts(correct[0], total)


def evaluate(
    model: nn.Module,
    batches: Batches,
    *,
    device: str | torch.device,
    num_classes: int,
    dtype: torch.dtype | None = None,
) -> ClassCounts:
    """Per-class correct counts of one plain evaluation pass (eval mode, no grad)."""
    _check_model_classes(model, num_classes)
    work = _prepared(model, device, dtype)
    dev = _resolve_device(device)
    wdtype = next(work.parameters()).dtype
    correct = torch.zeros(num_classes, dtype=torch.long, device=dev)
    total = torch.zeros(num_classes, dtype=torch.long, device=dev)
    with eval_mode(work), torch.no_grad():
        for x, y in _batches_on(batches, dev, wdtype, num_classes):
            correct += _class_hits(y, work(x).argmax(1) == y, num_classes)
            total += torch.bincount(y, minlength=num_classes)
    return ClassCounts(correct.cpu(), total.cpu())


def precision_differences(
    model: nn.Module,
    layer: str,
    batches: Batches,
    units: Units = None,
    *,
    device: str | torch.device,
    num_classes: int,
) -> tuple[int, int]:
    """(pairs checked, pairs that differ): (unit, image) pairs whose correctness under ablation
    differs between float32 and a float64 recomputation.

    Each image runs alone through :func:`ablate_units` in both precisions, so the
    comparison is per pair, not of summed counts. Zero differences means the
    float32 counts of these images equal the exact (naive-loop) ones.
    """
    pairs = differ = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            one = [(x[i : i + 1], torch.as_tensor(y)[i : i + 1])]
            kw = dict(device=device, num_classes=num_classes)
            hit32 = ablate_units(model, layer, one, units, dtype=torch.float32, **kw).correct.sum(1)
            hit64 = ablate_units(model, layer, one, units, dtype=torch.float64, **kw).correct.sum(1)
            pairs += hit32.numel()
            differ += int((hit32 != hit64).sum())
    return pairs, differ


def ablate_units_naive(
    model: nn.Module,
    layer: str,
    batches: Batches,
    units: Units = None,
    *,
    device: str | torch.device,
    num_classes: int,
    dtype: torch.dtype | None = None,
) -> AblationCounts:
    """Reference for :func:`ablate_units`: one full forward pass per unit with a hook zeroing it.

    What dissect does; as many whole-network passes as units. For tests and benchmarks.
    """
    _check_model_classes(model, num_classes)
    site = unit_layer(model, layer)
    index = check_units(model, layer, units)
    work = _prepared(model, device, dtype)
    dev = _resolve_device(device)
    wdtype = next(work.parameters()).dtype
    correct = torch.zeros(index.numel(), num_classes, dtype=torch.long, device=dev)
    lost = torch.zeros(index.numel(), num_classes, dtype=torch.long, device=dev)
    total = torch.zeros(num_classes, dtype=torch.long, device=dev)
    baseline = torch.zeros(num_classes, dtype=torch.long, device=dev)
    with eval_mode(work), torch.no_grad():
        for x, y in _batches_on(batches, dev, wdtype, num_classes):
            total += torch.bincount(y, minlength=num_classes)
            base_hit = work(x).argmax(1) == y
            baseline += _class_hits(y, base_hit, num_classes)
            for row, u in enumerate(index.tolist()):
                with edit_layer(work, site, zero_units([u])):
                    hit = work(x).argmax(1) == y
                correct[row] += _class_hits(y, hit, num_classes)
                lost[row] += _class_hits(y, base_hit & ~hit, num_classes)
    return AblationCounts(layer, index, correct.cpu(), total.cpu(), baseline.cpu(), lost.cpu())


# --------------------------------------------------------------------------- tables and rankings


def _class_labels(counts_k: int, class_names: Sequence[str] | None) -> list:
    if class_names is None:
        return list(range(counts_k))
    if len(class_names) != counts_k:
        raise ConfigError(f"{len(class_names)} class names given for {counts_k} classes")
    return list(class_names)


def _significance(lost: np.ndarray, gained: np.ndarray, n: np.ndarray, family: np.ndarray) -> dict[str, np.ndarray]:
    """Paired-test columns for changes measured on the same images as the baseline.

    ``lost``/``gained`` are the discordant images (right -> wrong, wrong -> right)
    out of ``n``; ``family`` labels which rows share a Benjamini-Hochberg correction.
    Columns: ci_low, ci_high (95% Agresti-Min interval of the change), p_value
    (McNemar's exact test), q_value (BH within each family), significant (q < alpha).
    """
    empty = n == 0  # a class without images: nothing to test
    low, high = paired_proportion_interval(lost, gained, np.maximum(n, 1))
    p = mcnemar_exact(lost, gained)
    low, high, p = (np.where(empty, np.nan, v) for v in (low, high, p))
    q = np.full_like(p, np.nan)
    for f in np.unique(family):
        rows = family == f
        q[rows] = bh_qvalues(p[rows])
    return {"ci_low": low, "ci_high": high, "p_value": p, "q_value": q, "significant": q < ALPHA}


def class_accuracy(counts: AblationCounts, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Tidy per-unit, per-class table: one row per (unit, class).

    Columns: unit, class (index), [class_name], accuracy (with the unit ablated),
    baseline_accuracy, change (= accuracy - baseline_accuracy; > 0: removing the
    unit helps that class), correct, total, lost, gained, and the paired test of
    :func:`_significance` with q-values over the units of each class. Classes
    without images have NaN accuracy, interval and p-value.
    """
    u, k = counts.correct.shape
    df = pd.DataFrame(
        {
            "unit": counts.units.repeat_interleave(k).numpy(),
            "class": torch.arange(k).repeat(u).numpy(),
            "accuracy": counts.accuracy.reshape(-1).numpy(),
            "baseline_accuracy": counts.baseline_accuracy.repeat(u).numpy(),
            "correct": counts.correct.reshape(-1).numpy(),
            "total": counts.total.repeat(u).numpy(),
            "lost": counts.lost.reshape(-1).numpy(),
            "gained": counts.gained.reshape(-1).numpy(),
        }
    )
    df.insert(4, "change", df["accuracy"] - df["baseline_accuracy"])
    for column, values in _significance(df["lost"].to_numpy(), df["gained"].to_numpy(), df["total"].to_numpy(),
                                        df["class"].to_numpy()).items():
        df[column] = values
    if class_names is not None:
        df.insert(2, "class_name", [_class_labels(k, class_names)[i] for i in df["class"]])
    return df


def unit_accuracy(counts: AblationCounts) -> pd.DataFrame:
    """Overall accuracy per ablated unit, with its paired test against the unablated model.

    Columns: unit, accuracy, baseline_accuracy, change, lost, gained (images over
    all classes), ci_low, ci_high, p_value, q_value (BH across the units), significant.
    Overall = correct / images over all classes (weighted by class size; equal to
    the mean class accuracy on a balanced set such as Places365 val).
    """
    n = counts.num_images
    acc = counts.correct.sum(1).double() / n if n else torch.full((counts.units.numel(),), float("nan"))
    base = float(counts.baseline_correct.sum()) / n if n else float("nan")
    df = pd.DataFrame({"unit": counts.units.numpy(), "accuracy": acc.numpy(), "baseline_accuracy": base})
    df["change"] = df["accuracy"] - df["baseline_accuracy"]
    df["lost"] = counts.lost.sum(1).numpy()
    df["gained"] = counts.gained.sum(1).numpy()
    sig = _significance(df["lost"].to_numpy(), df["gained"].to_numpy(), np.full(len(df), n), np.zeros(len(df)))
    for column, values in sig.items():
        df[column] = values
    return df


def _verdict(change: pd.Series) -> pd.Series:
    return pd.Series(["bad" if c > 0 else "good" if c < 0 else "neutral" for c in change], index=change.index)


def rank_units(counts: AblationCounts) -> pd.DataFrame:
    """Units ranked overall, most important first: unit_accuracy plus ``rank`` and ``verdict``.

    Sorted by change ascending (ties by unit): rank 1 is the unit whose removal
    lowers accuracy most. verdict: "good" (removal lowers accuracy), "bad"
    (removal raises it; the paper's worst units), "neutral".
    """
    df = unit_accuracy(counts).sort_values(["change", "unit"], kind="stable").reset_index(drop=True)
    df["rank"] = range(1, len(df) + 1)
    df["verdict"] = _verdict(df["change"])
    return df


def worst_units(counts: AblationCounts, k: int) -> list[int]:
    """The k units whose removal raises overall accuracy most (largest change first; ties by unit).

    Taken by rank even when fewer than k units are strictly "bad"; filter
    :func:`rank_units` by verdict for only those.
    """
    df = unit_accuracy(counts).assign(neg=lambda d: -d["change"])
    return [int(u) for u in df.sort_values(["neg", "unit"], kind="stable")["unit"].head(k)]


def best_units(counts: AblationCounts, k: int) -> list[int]:
    """The k units whose removal lowers overall accuracy most (most negative change first; ties by unit)."""
    return [int(u) for u in rank_units(counts)["unit"].head(k)]


def rank_units_per_class(
    counts: AblationCounts, k: int = 5, class_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """For every class, its k best ("good") and k worst ("bad") units by change of that class's accuracy.

    Columns: class, [class_name], verdict ("good": removal lowers the class's
    accuracy most; "bad": raises it most), rank (1..k within class and verdict),
    unit, accuracy, baseline_accuracy, change. Ranking is by change alone, so a
    "bad" row can have change <= 0 when fewer than k units help the class.
    Classes without images are left out.
    """
    df = class_accuracy(counts, class_names).dropna(subset=["accuracy"])
    good = df.sort_values(["class", "change", "unit"], kind="stable").groupby("class").head(k)
    bad = (
        df.assign(neg=-df["change"])
        .sort_values(["class", "neg", "unit"], kind="stable")
        .groupby("class")
        .head(k)
        .drop(columns="neg")
    )
    parts = []
    for verdict, part in (("good", good), ("bad", bad)):
        part = part.copy()
        part["verdict"] = verdict
        part["rank"] = part.groupby("class").cumcount() + 1
        parts.append(part)
    cols = ["class"] + (["class_name"] if class_names is not None else []) + [
        "verdict",
        "rank",
        "unit",
        "accuracy",
        "baseline_accuracy",
        "change",
    ]
    cols += ["lost", "gained", "ci_low", "ci_high", "p_value", "q_value", "significant"]
    out = pd.concat(parts)[cols]
    return out.sort_values(["class", "verdict", "rank"], kind="stable").reset_index(drop=True)
