"""Per-unit ablation: per-class accuracy of the network with each unit removed.

Paper (PAPER.md section 2 item 1; Kim, Samith, Utama section 3.1, after Bau et
al. 2020 "Understanding the role of individual units"): for every unit u of
conv5_3, set its activation to zero (after its ReLU) and measure the accuracy of
each class; compare with the unablated per-class accuracy. Units whose removal
raises accuracy are "bad", those whose removal lowers it most are "good" (here
"harmful" and "useful", and only when the change is significant: :mod:`analysis.rankings`).

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

The results are :class:`~analysis.counts.AblationCounts` (mergeable over unit
chunks and data shards); tables and rankings of them are in :mod:`analysis.rankings`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from analysis.counts import AblationCounts, ClassCounts
from analysis.evaluation import Batches, batches_on, check_model_classes, class_hits, prepared_model, resolve_device
from analysis.hooks import check_units, edit_layer, eval_mode, flat_children, num_units, unit_layer, zero_units
from trainables.errors import ConfigError

__all__ = [
    "ablate_unit_set",
    "ablate_units",
    "ablate_units_naive",
    "precision_differences",
]

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


# --------------------------------------------------------------------------- the engine


@dataclass
class _TailPlan:
    """How the network splits around the ablated layer (see the module docstring, step 3)."""

    trunk: nn.Sequential  # input -> acts (up to and including the ablated module)
    separable: nn.Sequential  # channel-separable, zero-preserving maps after it (run once)
    flatten: bool  # a Flatten(1) sits between them and ``linear``
    linear: nn.Linear | None  # low-rank-updated layer; None: generic path
    tail: nn.Sequential  # after ``linear`` (fast path) or after the ablated module (generic)


def _tail_plan(model: nn.Sequential, site: str) -> _TailPlan:
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
        return _TailPlan(model[:i], model[i:j], flatten, children[k][1], model[k + 1 :])
    return _TailPlan(model[:i], nn.Sequential(), False, None, model[i:])


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


def _row_ranges(rows_per_unit: torch.Tensor, limit: int) -> Iterator[tuple[int, int]]:
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
    plan = _tail_plan(model, site)
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

    for x, y in batches_on(batches, device, dtype, num_classes):
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
            for g0, g1 in _row_ranges(live.sum(1).cpu(), limit):  # compact: live pairs only
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
        baseline += class_hits(y, base_hit, num_classes)
    return correct.cpu(), total.cpu(), baseline.cpu(), lost.cpu()


# --------------------------------------------------------------------------- public API


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
    check_model_classes(model, num_classes)
    site = unit_layer(model, layer)
    index = check_units(model, layer, units)
    work = prepared_model(model, device, dtype)
    masks = torch.zeros(index.numel(), num_units(work, layer), dtype=torch.bool)
    masks[torch.arange(index.numel()), index] = True
    with eval_mode(work), torch.no_grad():
        correct, total, baseline, lost = _ablation_pass(
            work, site, batches, masks, device=resolve_device(device), num_classes=num_classes, chunk=chunk
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
    check_model_classes(model, num_classes)
    site = unit_layer(model, layer)
    index = check_units(model, layer, units)
    work = prepared_model(model, device, dtype)
    masks = torch.zeros(1, num_units(work, layer), dtype=torch.bool)
    masks[0, index] = True
    with eval_mode(work), torch.no_grad():
        correct, total, _, _ = _ablation_pass(
            work, site, batches, masks, device=resolve_device(device), num_classes=num_classes, chunk=chunk
        )
    return ClassCounts(correct[0], total)


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
    check_model_classes(model, num_classes)
    site = unit_layer(model, layer)
    index = check_units(model, layer, units)
    work = prepared_model(model, device, dtype)
    dev = resolve_device(device)
    wdtype = next(work.parameters()).dtype
    correct = torch.zeros(index.numel(), num_classes, dtype=torch.long, device=dev)
    lost = torch.zeros(index.numel(), num_classes, dtype=torch.long, device=dev)
    total = torch.zeros(num_classes, dtype=torch.long, device=dev)
    baseline = torch.zeros(num_classes, dtype=torch.long, device=dev)
    with eval_mode(work), torch.no_grad():
        for x, y in batches_on(batches, dev, wdtype, num_classes):
            total += torch.bincount(y, minlength=num_classes)
            base_hit = work(x).argmax(1) == y
            baseline += class_hits(y, base_hit, num_classes)
            for row, u in enumerate(index.tolist()):
                with edit_layer(work, site, zero_units([u])):
                    hit = work(x).argmax(1) == y
                correct[row] += class_hits(y, hit, num_classes)
                lost[row] += class_hits(y, base_hit & ~hit, num_classes)
    return AblationCounts(layer, index, correct.cpu(), total.cpu(), baseline.cpu(), lost.cpu())
