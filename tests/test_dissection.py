"""Network dissection (analysis/dissection.py) and the Broden reader (analysis/broden.py).

Definitions checked independently of the code: a numpy bilinear upsampling and
a numpy IoU over the whole set, thresholds by sorting all values.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from analysis.concepts import ShapesConcepts, concept_batches
from analysis.dissection import (
    ConceptCounts,
    TopActivations,
    dissect_layer,
    iou_pass,
    label_units,
    threshold_pass,
)
from trainables.data import CATEGORIES, CONCEPTS, MEAN_STD, make_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- planted units


class Planted(nn.Module):
    """Images -> 4 designed channels at full resolution.

    0: fires exactly on red pixels (from the pixels: R high, G and B low);
    1: circle pixels, 2: stripes-texture pixels (looked up from the shapes
    segmentation by the image's bytes: an oracle "precomputed channel");
    3: zero (a dead unit). Values on the mask vary in [1, 2).
    """

    def __init__(self, data, mean_std):
        super().__init__()
        self.mean = torch.tensor(mean_std[0]).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(mean_std[1]).view(1, -1, 1, 1) * 255
        seg = data.segmentation
        circle = seg[:, CATEGORIES.index("shape")] == CONCEPTS["shape"].index("circle") + 1
        stripes = seg[:, CATEGORIES.index("texture")] == CONCEPTS["texture"].index("stripes") + 1
        self.lookup = {data.images[i].numpy().tobytes(): torch.stack([circle[i], stripes[i]]) for i in range(len(data))}

    def forward(self, x):
        pix = (x * self.std + self.mean).round().clamp(0, 255)  # (B, 3, H, W) back to 0..255
        red = (pix[:, 0] > 150) & (pix[:, 1] < 100) & (pix[:, 2] < 100)
        oracle = torch.stack([self.lookup[p.to(torch.uint8).numpy().tobytes()] for p in pix])  # (B, 2, H, W)
        masks = torch.cat([red[:, None], oracle, torch.zeros_like(red)[:, None]], 1).float()
        ramp = 1 + torch.linspace(0, 1, x.shape[-1], dtype=torch.float32).view(1, 1, 1, -1) * 0.99
        return masks * ramp


def planted_net(data) -> nn.Sequential:
    conv = nn.Conv2d(4, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        conv.bias.zero_()
    return nn.Sequential(OrderedDict(
        planted=Planted(data, MEAN_STD["shapes"]), conv=conv, relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(4, 2),
    )).eval()


def test_planted_units_get_their_concepts():
    data = make_shapes(120, 32, seed=3)
    concepts = ShapesConcepts(data.images, data.segmentation)
    batches = concept_batches(concepts, range(120), batch_size=50, mean_std=MEAN_STD["shapes"])
    # Every unit's area is q N positions when its concept covers more, so IoU <= coverage ratio;
    # q = 0.2 exceeds every concept's coverage here and the threshold lands on the units' zeros.
    result = dissect_layer(planted_net(data), "conv", batches, concepts.concepts, device="cpu", quantile=0.2)
    units = result.units.set_index("unit")
    for unit, (label, category) in {0: ("red", "colour"), 1: ("circle", "shape"), 2: ("stripes", "texture")}.items():
        row = units.loc[unit]
        assert (row["label"], row["category"]) == (label, category)
        assert row["iou"] > 0.5 and row["detector"]
    assert units.loc[1, "iou"] == 1.0 and units.loc[2, "iou"] == 1.0  # the oracle units fire exactly on the masks
    assert units.loc[3, "iou"] == 0.0 and not units.loc[3, "detector"]


# --------------------------------------------------------------------------- definitions in numpy


def np_bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, U, h, w) -> (B, U, H, W): half-pixel centres, edges clamped (align_corners=False)."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, ly = axis(a.shape[2], size[0])
    x0, x1, lx = axis(a.shape[3], size[1])
    rows = a[:, :, y0] * (1 - ly)[:, None] + a[:, :, y1] * ly[:, None]
    return rows[..., x0] * (1 - lx) + rows[..., x1] * lx


class Fixed(nn.Module):
    """A "network" whose layer output is a fixed tensor per image id (image = its id in every pixel)."""

    def __init__(self, acts: torch.Tensor):
        super().__init__()
        self.acts = acts

    def forward(self, x):
        return self.acts[x[:, 0, 0, 0].long()]


def small_case(seed=0, n=7, units=3, h=3, size=(8, 8), layers=2, k=5):
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(n, units, h, h, generator=g) * (torch.rand(n, units, h, h, generator=g) > 0.3)
    labels = torch.randint(0, k + 1, (n, layers, *size), generator=g)
    labels[:, 1] *= torch.rand(n, *size, generator=g) > 0.6  # sparser second layer
    model = nn.Sequential(OrderedDict(fixed=Fixed(acts)))
    ids = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    batches = [(ids[i : i + 3], labels[i : i + 3]) for i in range(0, n, 3)]
    return model, batches, acts, labels


def np_dissection(acts, labels, q, k):
    up = np_bilinear(acts.double().numpy(), labels.shape[-2:])  # (N, U, H, W)
    flat = up.transpose(1, 0, 2, 3).reshape(up.shape[1], -1)
    n = flat.shape[1]
    t = -np.sort(-flat, axis=1)[:, math.floor(q * n)]
    on = up > t[None, :, None, None]  # (N, U, H, W)
    lab = labels.numpy()
    inter = np.zeros((up.shape[1], k), dtype=np.int64)
    area_c = np.zeros(k, dtype=np.int64)
    for c in range(1, k + 1):
        s = (lab == c).any(1)  # (N, H, W)
        area_c[c - 1] = s.sum()
        inter[:, c - 1] = (on & s[:, None]).sum((0, 2, 3))
    area_u = on.sum((0, 2, 3))
    iou = inter / np.maximum(area_u[:, None] + area_c[None] - inter, 1)
    return t, inter, area_u, area_c, iou


@pytest.mark.exactness
def test_iou_equals_brute_force_numpy():
    model, batches, acts, labels = small_case()
    q, k = 0.1, 5
    n = labels.shape[0] * labels.shape[-2] * labels.shape[-1]
    top = threshold_pass(model, "fixed", batches, quantile=q, total_positions=n, device="cpu")
    t = top.thresholds(q)
    counts = iou_pass(model, "fixed", batches, t, num_concepts=k, device="cpu")
    t_np, inter, area_u, area_c, iou = np_dissection(acts, labels, q, k)
    np.testing.assert_allclose(t.numpy(), t_np, rtol=1e-6)
    assert np.array_equal(counts.intersection.numpy(), inter)
    assert np.array_equal(counts.unit_area.numpy(), area_u)
    assert np.array_equal(counts.concept_area.numpy(), area_c)
    np.testing.assert_allclose(counts.iou.numpy(), iou, rtol=1e-12)
    assert counts.positions == n
    # the ceiling: IoU can be no larger than the smaller area over the larger
    ceiling = np.minimum(area_u[:, None], area_c[None]) / np.maximum(np.maximum(area_u[:, None], area_c[None]), 1)
    np.testing.assert_allclose(counts.iou_ceiling.numpy(), ceiling, rtol=1e-12)
    assert (counts.iou <= counts.iou_ceiling + 1e-12).all()
    from analysis.concepts import ConceptSet

    units = label_units(counts, ConceptSet(tuple(f"c{i}" for i in range(1, k + 1)), ("cat",) * k), 0.04)
    best = iou.argmax(1)
    rows = np.arange(len(best))
    np.testing.assert_allclose(units["ceiling"], ceiling[rows, best], rtol=1e-12)
    np.testing.assert_allclose(units["concept_share"], area_c[best] / n, rtol=1e-12)
    np.testing.assert_allclose(units["iou_to_ceiling"], iou[rows, best] / ceiling[rows, best], rtol=1e-9)


def test_a_layer_map_under_7x7_gets_one_line_saying_what_to_do():
    from study.dissect import coarse_map_warning

    line = coarse_map_warning("conv5_3", (2, 2), 32)
    assert line.startswith("warning: conv5_3's map is 2x2 on 32 px images, too coarse")
    assert "--layer conv3_3, 8x8 at this size" in line and "\n" not in line
    assert "--layer conv4_3, 8x8" in coarse_map_warning("conv5_3", (4, 4), 64)
    assert coarse_map_warning("conv5_3", (7, 7), 112) is None


@pytest.mark.exactness
def test_sharded_result_equals_single_process():
    model, batches, acts, labels = small_case(seed=1)
    q, k = 0.05, 5
    names = tuple(f"c{i}" for i in range(1, k + 1))
    from analysis.concepts import ConceptSet

    concepts = ConceptSet(names, ("a", "a", "b", "b", "b"))
    whole = dissect_layer(model, "fixed", batches, concepts, device="cpu", quantile=q)
    n = labels.shape[0] * labels.shape[-2] * labels.shape[-1]
    shards = [batches[:1], batches[1:]]
    tops = [TopActivations.from_state_dict(threshold_pass(model, "fixed", s, quantile=q, total_positions=n,
                                                          device="cpu").state_dict()) for s in shards]
    top = tops[0] + tops[1]
    t = top.thresholds(q)
    assert torch.equal(t, whole.counts.thresholds)
    assert torch.equal(top.image_max, whole.top.image_max)
    parts = [ConceptCounts.from_state_dict(iou_pass(model, "fixed", s, t, num_concepts=k, device="cpu").state_dict())
             for s in shards]
    merged = parts[0] + parts[1]
    for field in ("intersection", "unit_area", "concept_area"):
        assert torch.equal(getattr(merged, field), getattr(whole.counts, field))
    assert label_units(merged, concepts, 0.04).equals(whole.units)


def _quantile_case(q, mask):
    g = torch.Generator().manual_seed(4)
    acts = torch.randn(20, 4, 8, 8, generator=g)  # continuous: no ties before upsampling
    model = nn.Sequential(OrderedDict(fixed=Fixed(acts)))
    labels = torch.zeros(20, 1, mask, mask, dtype=torch.long)
    ids = torch.arange(20, dtype=torch.float32).view(20, 1, 1, 1).expand(20, 3, 1, 1)
    batches = [(ids[i : i + 6], labels[i : i + 6]) for i in range(0, 20, 6)]
    n = 20 * mask * mask
    t = threshold_pass(model, "fixed", batches, quantile=q, total_positions=n, device="cpu").thresholds(q)
    up = torch.nn.functional.interpolate(acts, size=(mask, mask), mode="bilinear", align_corners=False)
    # F.interpolate and the code's upsampling may differ in the last bits: compare with a margin.
    eps = 1e-5 if mask != 8 else 0.0
    above = (up > t.view(1, -1, 1, 1) + eps).double().mean((0, 2, 3))
    at_or_above = (up >= t.view(1, -1, 1, 1) - eps).double().mean((0, 2, 3))
    return n, above, at_or_above


@pytest.mark.exactness
@pytest.mark.parametrize("q", [0.01, 0.05, 0.2])
def test_thresholds_hit_the_requested_quantile(q):
    n, above, _ = _quantile_case(q, mask=8)  # distinct values
    assert (above - q).abs().max() <= 1 / n


@pytest.mark.exactness
@pytest.mark.parametrize("q", [0.01, 0.05])
def test_thresholds_bracket_the_quantile_when_upsampling_ties_values(q):
    # Bilinear upsampling with clamped edges repeats border values, so ties exist:
    # P[a > t] <= q <= P[a >= t].
    n, above, at_or_above = _quantile_case(q, mask=32)
    assert (above <= q + 1e-12).all() and (at_or_above >= q - 1e-12).all()


# --------------------------------------------------------------------------- pruning


def subsets_upsampled_otherwise(upsample_fn, maps: torch.Tensor, size) -> int:
    """How many subsets of ``maps`` (prefixes and random picks of 1 to 150 maps, one map alone included)
    ``upsample_fn`` computes to other bits than inside the whole stack."""
    g = torch.Generator().manual_seed(5)
    full = upsample_fn(maps, size)
    picks = [torch.arange(n) for n in (1, 2, 3, 5)] + [torch.randperm(len(maps), generator=g)[:n]
                                                       for n in (1, 2, 3, 17, 150)]
    return sum(not torch.equal(upsample_fn(maps[p], size), full[p]) for p in picks)


@pytest.mark.exactness
@pytest.mark.parametrize("h,w,size", [(2, 2, (32, 32)), (3, 5, (8, 13)), (7, 7, (28, 28)), (7, 7, (112, 112)),
                                      (14, 14, (112, 112)), (4, 4, (4, 9))])
def test_each_map_upsamples_alone_to_the_same_bits(h, w, size):
    """The passes upsample different subsets of (image, unit) maps and shards different images; each map's
    values must not depend on which others are computed with it. The values are bilinear's (numpy, float64)."""
    from analysis.upsample import upsample_rows

    maps = torch.randn(360, h, w, generator=torch.Generator().manual_seed(4)).clamp_min(0)
    np.testing.assert_allclose(upsample_rows(maps[:40], size).view(40, 1, *size).numpy()[:, 0],
                               np_bilinear(maps[:40].double().numpy()[:, None], size)[:, 0], rtol=1e-5, atol=1e-6)
    assert subsets_upsampled_otherwise(upsample_rows, maps, size) == 0


def test_the_subset_check_catches_an_upsampling_whose_bits_depend_on_the_batch():
    """The check above can fail: a stand-in that sums in float64 for small stacks (as a BLAS may take another
    kernel for few rows) and in float32 otherwise differs from itself across subsets."""
    from analysis.upsample import upsample_rows

    def batch_dependent(maps, size):
        if len(maps) < 4:
            return upsample_rows(maps.double(), size).float()
        k = upsample_rows(torch.eye(maps[0].numel()).view(-1, *maps.shape[1:]), size)  # (h w, H W) kernel
        return maps.flatten(1) @ k

    maps = torch.randn(360, 7, 7, generator=torch.Generator().manual_seed(4)).clamp_min(0)
    assert subsets_upsampled_otherwise(batch_dependent, maps, (28, 28)) >= 3


@pytest.mark.exactness
def test_no_upsampled_value_exceeds_the_peak_bound():
    """Bilinear values are weighted means of the map; in float32 the weights can sum past 1 by some ulps.
    Adversarial maps: one value at the peak everywhere but one cell, negatives, subnormals, zeros."""
    from analysis.activations import peak_bound
    from analysis.upsample import upsample_rows

    g = torch.Generator().manual_seed(6)
    cases = [torch.rand(300, 3, 3, generator=g) * 10.0 ** torch.randint(-40, 38, (300, 1, 1), generator=g),
             -torch.rand(300, 3, 3, generator=g),  # all negative
             torch.full((300, 3, 3), 0.7).index_put_((torch.arange(300), torch.full((300,), 1), torch.full((300,), 1)),
                                                     torch.rand(300, generator=g) * 0.7),
             torch.zeros(50, 3, 3), -torch.rand(50, 3, 3, generator=g) * torch.tensor([1.0, 0.0, 1.0]).view(1, 1, 3)]
    for maps in cases:
        for size in [(8, 8), (7, 11), (32, 32)]:
            values = upsample_rows(maps, size)
            bound = peak_bound(maps.flatten(1).amax(1))
            assert (values <= bound[:, None]).all(), size
    assert peak_bound(torch.tensor([0.0])).item() == 0.0


def _skewed_case(seed=7, n=60, units=6, batch=7):
    """Sparse maps with a few strong images per unit (so most pairs are pruned), one dead unit and one that
    is zero on 99.5% of its positions (its threshold is 0), one whose peaks all lie within 1% of each other
    (a bound a little too low drops its values); two label layers that sometimes repeat a concept."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(n, units, 4, 4, generator=g) * (torch.rand(n, units, 1, 1, generator=g) < 0.3)
    acts *= torch.rand(n, units, 1, 1, generator=g) ** 4 * 10  # peaks spread over orders of magnitude
    acts[:, 0] = 0  # dead
    acts[:, 1] = 0
    acts[::20, 1, 0, 0] = 1.0  # rare
    acts[:, 2] = 1 + 0.01 * torch.rand(n, 4, 4, generator=g)  # dense, peaks close to the threshold
    labels = torch.randint(0, 6, (n, 2, 12, 12), generator=g)
    labels[:, 1] = torch.where(torch.rand(n, 12, 12, generator=g) < 0.3, labels[:, 0], 0)  # same id twice
    model = nn.Sequential(OrderedDict(fixed=Fixed(acts)))
    ids = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    batches = [(ids[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]
    return model, batches, acts, labels


@pytest.mark.exactness
@pytest.mark.parametrize("group", [2**25, 200])
def test_pruned_passes_equal_the_definitions_and_skip_most_pairs(monkeypatch, group):
    """Pass 1 (top_k and the histogram's level 2) and pass 2 upsample only the pairs that can matter; the
    thresholds equal sorting every value, the counts the numpy definitions, the per-category areas a
    per-image walk. ``group`` 200 activations: every batch pruned on its own."""
    import analysis.activations
    import analysis.dissection
    import analysis.thresholds as th

    monkeypatch.setattr(th, "GROUP_ELEMENTS", group)
    model, batches, acts, labels = _skewed_case()
    q, k = 0.02, 5
    n = labels.shape[0] * labels.shape[-2] * labels.shape[-1]
    upsampled = []

    def counted(a, image, unit, size):
        upsampled.append(image.numel())
        return analysis.activations.pair_values(a, image, unit, size)

    monkeypatch.setattr(th, "pair_values", counted)
    monkeypatch.setattr(analysis.dissection, "pair_values", counted)
    top = threshold_pass(model, "fixed", batches, quantile=q, total_positions=n, device="cpu")
    pass1 = sum(upsampled)
    t = top.thresholds(q)
    t_np, inter, area_u, area_c, _ = np_dissection(acts, labels, q, k)
    from analysis.upsample import upsample

    every = upsample(acts, tuple(labels.shape[-2:])).transpose(0, 1).reshape(acts.shape[1], -1)
    assert torch.equal(t, every.sort(1, descending=True).values[:, math.floor(q * n)]), "thresholds as by sorting"
    np.testing.assert_allclose(t.numpy(), t_np, rtol=1e-6)
    assert t[0] == 0 and t[1] == 0
    assert torch.equal(top.image_max, acts.flatten(2).amax(2)), "Figure 3 ranks by each map's own peak"
    pairs = acts.shape[0] * acts.shape[1]
    assert pass1 < pairs / 2, f"pass 1 upsampled {pass1} of {pairs} pairs"

    level1 = th.histogram_pass(model, "fixed", batches, device="cpu")
    prefix, _ = th.threshold_bins(level1, q)
    upsampled.clear()
    level2 = th.histogram_pass(model, "fixed", batches, device="cpu", prefix=prefix)
    assert torch.equal(th.histogram_thresholds(level1, level2, q), t)
    assert sum(upsampled) < 0.6 * pairs  # the zero-threshold units' 120 pairs all reach the bin of 0

    category = torch.tensor([0, 0, 1, 1, 2])
    upsampled.clear()
    counts = iou_pass(model, "fixed", batches, t, num_concepts=k, device="cpu", concept_category=category)
    assert sum(upsampled) < pairs / 2
    assert np.array_equal(counts.intersection.numpy(), inter)
    assert np.array_equal(counts.unit_area.numpy(), area_u)
    assert np.array_equal(counts.concept_area.numpy(), area_c)
    up = np_bilinear(acts.double().numpy(), labels.shape[-2:])
    on = up > t_np[None, :, None, None]  # (N, U, H, W)
    lab = labels.numpy()
    want = np.zeros((acts.shape[1], 3), dtype=np.int64)
    for img in range(acts.shape[0]):
        for unit in range(acts.shape[1]):
            concepts_hit = set(lab[img][:, on[img, unit]].ravel().tolist()) - {0}
            for g_ in {int(category[c - 1]) for c in concepts_hit}:
                want[unit, g_] += on[img, unit].sum()
    assert np.array_equal(counts.category_area.numpy(), want)


@pytest.mark.exactness
def test_pruned_passes_equal_sorting_on_random_shapes(monkeypatch):
    """40 random cases: map and mask sizes (integer and not), batch sizes, groups, ties, ReLU zeros, dead
    pairs, both threshold sources, q from 0.001 to 0.9: top_k values, both thresholds and the counts equal
    the definitions computed over every value."""
    import random

    import analysis.thresholds as th
    from analysis.upsample import upsample

    for seed in range(40):
        rnd, g = random.Random(seed), torch.Generator().manual_seed(seed)
        n, units, h = rnd.randint(1, 30), rnd.randint(1, 6), rnd.choice([1, 2, 3, 4, 7])
        size = rnd.choice([h, 2 * h, 3 * h + 1, 16])
        acts = torch.randn(n, units, h, h, generator=g)
        if rnd.random() < 0.3:
            acts = acts.round()
        if rnd.random() < 0.5:
            acts = acts.clamp_min(0)
        acts *= (torch.rand(n, units, 1, 1, generator=g) < rnd.random()).float()
        model = nn.Sequential(OrderedDict(fixed=Fixed(acts)))
        ids = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 1, 1)
        labels = torch.randint(0, 4, (n, 1, size, size), generator=g)
        b = rnd.randint(1, 8)
        batches = [(ids[i : i + b], labels[i : i + b]) for i in range(0, n, b)]
        monkeypatch.setattr(th, "GROUP_ELEMENTS", rnd.choice([1, 50, 2**25]))
        on, q = rnd.choice(["upsampled", "raw"]), rnd.choice([0.001, 0.01, 0.1, 0.5, 0.9])
        every = upsample(acts, (size, size))
        flat = (every if on == "upsampled" else acts).transpose(0, 1).reshape(units, -1).sort(1, descending=True)
        k = math.floor(q * flat.values.shape[1])
        top = threshold_pass(model, "fixed", batches, quantile=q, total_positions=flat.values.shape[1],
                             device="cpu", on=on)
        assert torch.equal(top.values, flat.values[:, : k + 1]), seed
        t = flat.values[:, k]
        level1 = th.histogram_pass(model, "fixed", batches, device="cpu", on=on)
        level2 = th.histogram_pass(model, "fixed", batches, device="cpu", on=on,
                                   prefix=th.threshold_bins(level1, q)[0])
        assert torch.equal(th.histogram_thresholds(level1, level2, q), t), seed
        counts = iou_pass(model, "fixed", batches, t, num_concepts=3, device="cpu")
        active = every > t.view(1, -1, 1, 1)
        assert torch.equal(counts.unit_area, active.sum((0, 2, 3))), seed
        inter = torch.stack([(active & (labels == c)).sum((0, 2, 3)) for c in (1, 2, 3)], 1)
        assert torch.equal(counts.intersection, inter), seed


def test_activations_with_nan_are_one_error_in_every_pass():
    from analysis.thresholds import histogram_pass
    from trainables.errors import DataError

    model, batches, acts, _ = small_case()
    acts[4, 1, 0, 0] = float("nan")  # image 4: the second batch
    n = 7 * 8 * 8
    for run in (lambda: threshold_pass(model, "fixed", batches, quantile=0.1, total_positions=n, device="cpu"),
                lambda: histogram_pass(model, "fixed", batches, device="cpu"),
                lambda: iou_pass(model, "fixed", batches, torch.zeros(3), num_concepts=5, device="cpu")):
        with pytest.raises(DataError, match=r"^fixed's activations hold NaN or inf on batch 1 \(3 images\)"):
            run()


# --------------------------------------------------------------------------- radix-histogram thresholds


def test_float_keys_order_like_the_floats_and_invert():
    from analysis.thresholds import float_keys, keys_to_float

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, generator=g) * 10.0 ** torch.randint(-40, 30, (2000,), generator=g),
                   torch.tensor([0.0, -0.0, 1e-45, -1e-45, float("inf"), -float("inf"), 3.4e38, -3.4e38])])
    keys = float_keys(x)
    by_value = sorted(range(len(x)), key=lambda i: (x[i].item(), keys[i].item()))  # -0.0 == 0.0 as floats
    assert [keys[i].item() for i in by_value] == sorted(keys.tolist()), "keys sort like the values"
    high, low = (keys >> 16).long() + (1 << 15), (keys & 0xFFFF).long()
    assert torch.equal(keys_to_float(high, low).view(torch.int32), x.view(torch.int32)), "every bit comes back"


def test_rank_bins_against_a_naive_walk():
    from analysis.thresholds import rank_bins

    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 4, (6, 40), generator=g)
    rank = torch.tensor([int(torch.randint(0, int(c.sum()), (1,), generator=g)) for c in counts])
    b, within = rank_bins(counts, rank)
    for u in range(6):
        order = [j for j in range(39, -1, -1) for _ in range(int(counts[u, j]))]  # bins of the elements, top first
        assert b[u] == order[rank[u]]
        assert within[u] == order[: rank[u]].count(order[rank[u]])


@pytest.mark.exactness
@pytest.mark.parametrize("on", ["upsampled", "raw"])
@pytest.mark.parametrize("q", [0.005, 0.05, 0.3])
def test_histogram_thresholds_equal_sorting_and_the_top_k_method(on, q):
    """Two radix passes over three shards give the (floor(qN)+1)-th largest value: the same bits as
    sorting every value (the definition) and as the top_k method; ties, zeros, negatives and tiny values."""
    from analysis.thresholds import histogram_pass, histogram_thresholds, threshold_bins
    from analysis.upsample import upsample

    g = torch.Generator().manual_seed(2)
    acts = torch.randn(24, 5, 4, 4, generator=g)
    acts[:, 0] = acts[:, 0].round()  # heavy ties
    acts[:, 1] = acts[:, 1].clamp_min(0)  # a ReLU's zeros
    acts[:, 2] *= 1e-30  # values that share one high-bits bin
    acts[:, 3] = -acts[:, 3].abs()  # all negative
    model = nn.Sequential(OrderedDict(fixed=Fixed(acts)))
    ids = torch.arange(24, dtype=torch.float32).view(24, 1, 1, 1).expand(24, 3, 1, 1)
    labels = torch.zeros(24, 1, 9, 9, dtype=torch.long)
    shards = [[(ids[i : i + 4], labels[i : i + 4]) for i in range(lo, lo + 8, 4)] for lo in (0, 8, 16)]
    values = upsample(acts, (9, 9)) if on == "upsampled" else acts
    flat = values.transpose(0, 1).reshape(5, -1)
    expect = flat.sort(1, descending=True).values[:, math.floor(q * flat.shape[1])]

    def merged(parts):
        out = parts[0]
        for p in parts[1:]:
            out = out + type(p).from_state_dict(p.state_dict())
        return out

    level1 = merged([histogram_pass(model, "fixed", s, device="cpu", on=on) for s in shards])
    prefix, _ = threshold_bins(level1, q)
    level2 = merged([histogram_pass(model, "fixed", s, device="cpu", on=on, prefix=prefix) for s in shards])
    t = histogram_thresholds(level1, level2, q)
    assert torch.equal(t, expect)
    top = merged([threshold_pass(model, "fixed", s, quantile=q, total_positions=flat.shape[1], device="cpu", on=on)
                  for s in shards])
    assert torch.equal(top.thresholds(q), t)
    assert torch.equal(top.image_max, level1.image_max)


@pytest.mark.exactness
def test_histogram_dissection_equals_top_k_dissection():
    model, batches, _, _ = small_case(seed=3)
    from analysis.concepts import ConceptSet

    concepts = ConceptSet(tuple(f"c{i}" for i in range(1, 6)), ("a",) * 5)
    a = dissect_layer(model, "fixed", batches, concepts, device="cpu", quantile=0.05)
    b = dissect_layer(model, "fixed", batches, concepts, device="cpu", quantile=0.05, method="histogram")
    assert torch.equal(a.counts.thresholds, b.counts.thresholds)
    assert a.units.equals(b.units)


def test_the_threshold_method_fits_one_gib_per_task_or_says_what_does():
    from study.config import StudyConfig
    from study.dissect import threshold_method
    from trainables.errors import ConfigError

    def cfg(**d):
        return StudyConfig.model_validate({"dissection": {"quantile": 0.005, **d}})

    broden_upsampled = 63_305 * 112 * 112  # positions: full Broden at 112 px masks
    assert threshold_method(cfg(), 63_305 * 14 * 14, 512) == "top_k"  # raw maps: 127 MB of top values
    assert threshold_method(cfg(), broden_upsampled, 512) == "histogram"  # top_k would keep 7.6 GiB
    assert threshold_method(cfg(threshold_method="histogram"), 1000, 512) == "histogram"
    with pytest.raises(ConfigError, match=r"keep 7\.6 GiB per task \(limit 1 GiB\); use dissection.threshold_method=auto"):
        threshold_method(cfg(threshold_method="top_k"), broden_upsampled, 512)
    with pytest.raises(ConfigError, match="fewer units"):
        threshold_method(cfg(), broden_upsampled, 4096)


# --------------------------------------------------------------------------- Broden reader


def write_broden(root, n=3):
    """A tiny Broden tree: 8x8 images, 4x4 masks; colour masks (pixel), scene (image-level)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "label.csv").write_text(
        "number,name,category,frequency,coverage,syns\n0,-,,0,0,\n1,red-c,color(3),3,1.0,\n"
        "2,blue-c,color(2),2,1.0,\n3,kitchen-s,scene(2),2,1.0,\n4,street-s,scene(1),1,1.0,\n"
    )
    (root / "c_color.csv").write_text("code,number,name,frequency,coverage\n1,1,red-c,3,1\n2,2,blue-c,2,1\n")
    (root / "c_scene.csv").write_text("code,number,name,frequency,coverage\n1,3,kitchen-s,2,1\n2,4,street-s,1,1\n")
    rows = ["image,split,ih,iw,sh,sw,color,scene"]
    expected = []
    for i in range(n):
        img = np.full((8, 8, 3), 10 * i, dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        mask = np.zeros((4, 4, 3), dtype=np.uint8)
        mask[: i + 1, :, 0] = 1  # red-c in the first i+1 rows
        mask[3, 3, 0] = 2  # blue-c in a corner
        Image.fromarray(mask).save(root / "images" / f"im{i}_color.png")
        scene = "3" if i < 2 else "4"
        rows.append(f"im{i}.png,val,8,8,4,4,im{i}_color.png,{scene}")
        labels = np.zeros((2, 4, 4), dtype=np.int64)
        labels[0] = mask[:, :, 0]
        labels[1] = int(scene)
        expected.append(labels)
    rows.append("extra.png,train,8,8,4,4,,")
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    return np.stack(expected)


def test_missing_or_damaged_broden_files_are_one_line_naming_the_file(tmp_path):
    from analysis.broden import BrodenData
    from trainables.errors import DataError

    write_broden(tmp_path)
    with pytest.raises(DataError, match=r"Broden file .*extra.png named in index.csv is missing"):
        BrodenData(tmp_path, split=None)  # every row: the train row's image was never written
    mask = tmp_path / "images" / "im2_color.png"
    mask.write_bytes(mask.read_bytes()[:30])  # truncated, not on the first row: found when its task reads it
    data = BrodenData(tmp_path, split="val")
    with pytest.raises(DataError, match=r"^Broden mask .*im2_color.png is damaged"):
        data.load([2])
    (tmp_path / "images" / "im0.png").write_bytes(b"not a png")  # the first row is decoded up front
    with pytest.raises(DataError, match=r"^Broden image .*im0.png is damaged"):
        BrodenData(tmp_path, split="val")


def test_broden_reader_decodes_masks_and_image_level_labels(tmp_path):
    from analysis.broden import BrodenData

    expected = write_broden(tmp_path)
    data = BrodenData(tmp_path, split="val")
    assert data.num_images == 3 and data.mask_size == (4, 4) and data.image_size == (8, 8)
    assert data.concepts.names == ("red-c", "blue-c", "kitchen-s", "street-s")
    assert data.concepts.categories == ("color", "color", "scene", "scene")
    images, labels = data.load(range(3))
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8 and int(images[2, 0, 0, 0]) == 20
    assert np.array_equal(labels.numpy(), expected)


def test_broden_mask_number_is_r_plus_256_g(tmp_path):
    from PIL import Image

    from analysis.broden import BrodenData

    write_broden(tmp_path, n=1)
    big = np.zeros((4, 4, 3), dtype=np.uint8)
    big[0, 0] = (4, 1, 0)  # 4 + 256 * 1 = 260
    Image.fromarray(big).save(tmp_path / "images" / "im0_color.png")
    labels = "\n".join(f"{i},l{i},color(1),1,1," for i in range(5, 261))
    with open(tmp_path / "label.csv", "a") as f:
        f.write(labels + "\n")
    _, maps = BrodenData(tmp_path, split="val").load([0])
    assert int(maps[0, 0, 0, 0]) == 260


def test_broden_batches_run_through_dissection(tmp_path):
    from analysis.broden import BrodenData

    write_broden(tmp_path)
    data = BrodenData(tmp_path, split="val")
    batches = concept_batches(data, range(3), batch_size=2, mean_std=MEAN_STD["places365"])
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 2, 3, stride=2, padding=1), relu=nn.ReLU()))
    result = dissect_layer(model, "conv", batches, data.concepts, device="cpu", quantile=0.1)
    assert list(result.units.columns) == ["unit", "label", "category", "iou", "threshold", "iou_null", "p_value",
                                          "q_value", "detector", "concept_share", "ceiling", "iou_to_ceiling",
                                          "border_share", "border_expected", "positional"]
    assert result.counts.concept_area.tolist() == [4 + 8 + 12, 3, 2 * 16, 16]


def test_dissecting_at_another_size_than_the_training_one_is_refused_unless_asked_and_then_tagged():
    from study.config import load_config
    from study.dissect import check_image_size
    from tests.conftest import ROOT
    from trainables.errors import ConfigError

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert check_image_size(cfg, 32) is None
    with pytest.raises(ConfigError) as refused:
        check_image_size(cfg, 112)
    line = str(refused.value)
    assert "112 px" in line and "trained on 32 px" in line and "dissection.allow_other_size=true" in line
    assert "\n" not in line
    allowed = load_config(ROOT / "configs" / "quickstart.yaml", ["dissection.allow_other_size=true"])
    assert check_image_size(allowed, 112) == "112 px images on a model trained at 32 px"
