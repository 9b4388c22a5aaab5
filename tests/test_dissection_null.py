"""The dissection's null for every label, its border statistic and its join with ablation, on planted truths.

The null's moments are checked against a literal simulation of its two steps
(cells shuffled, pixels scattered inside each cell); the integer sums pass 2
counts for it against a naive numpy count; and a hand-built network whose
units are known (one fires exactly on crosses and carries the cross classes,
one fires everywhere on striped images, one fires on the frame) is dissected,
ablated and joined.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from analysis.ablation import ablate_units
from analysis.concepts import ShapesConcepts
from analysis.dissection import dissect_layer, iou_pass
from analysis.intervention import intervention_counts
from analysis.nulls import image_null
from analysis.unit_join import group_class_effects, group_effects, group_plan, headline, unit_effects
from tests.test_dissection import np_bilinear, small_case
from trainables.shapes import SHAPES, TEXTURES, make_shapes

pytestmark = pytest.mark.exactness


def test_null_moments_match_a_simulation_of_cells_shuffled_and_pixels_scattered():
    rng = np.random.default_rng(0)
    n, b, draws = 9, 4, 40_000  # a 3x3 map on 6x6 masks: cells of 2x2 pixels
    for _ in range(3):
        k = rng.integers(0, b + 1, size=n)  # the unit's active pixels in each cell
        concept = rng.random((n, b)) < 0.4  # the concept's pixels, cell by cell
        cell_of = rng.random((draws, n)).argsort(1)  # step 1: which cell's count lands in cell j
        rank = rng.random((draws, n, b)).argsort(2).argsort(2)  # step 2: a random order of the pixels in each cell
        active = rank < k[cell_of][:, :, None]
        inter = (active & concept[None]).sum((1, 2))
        m = concept.sum(1)
        mean, var = image_null(k.sum(), (k**2).sum(), m.sum(), (m**2).sum(), cells=n, pixels=n * b)
        se = inter.std() / np.sqrt(draws)
        assert abs(inter.mean() - mean) < 4 * se
        assert abs(inter.var() - var) < 0.05 * var + 1e-9  # the variance's sampling error is about 0.7% here


@pytest.mark.parametrize("h", [3, 4])  # cells of uneven and of even size (2x2 pixels)
def test_the_sums_pass_2_counts_for_the_null_equal_a_naive_count(h):
    model, batches, acts, labels = small_case(seed=3, n=7, units=3, h=h, size=(8, 8), k=5)
    t = torch.tensor([0.3, 0.5, 0.2])
    counts = iou_pass(model, "fixed", batches, t, num_concepts=5, device="cpu")
    on = np_bilinear(acts.double().numpy(), (8, 8)) > t.double().numpy()[None, :, None, None]  # (N, U, 8, 8)
    cell = (np.arange(8) * h // 8)[:, None] * h + (np.arange(8) * h // 8)[None, :]  # floor(y h / H) rows, same cols
    per_cell = np.stack([on[..., cell == j].sum(-1) for j in range(h * h)], -1)  # (N, U, h h)
    k1, k2 = per_cell.sum(-1), (per_cell**2).sum(-1)
    i, u = np.nonzero(k1)
    assert counts.image_unit.tolist() == np.stack([i, u, k1[i, u], k2[i, u]], 1).tolist()
    has = np.stack([(labels == c).any(1).numpy() for c in range(1, 6)], 1)  # (N, 5, 8, 8)
    m = np.stack([has[..., cell == j].sum(-1) for j in range(h * h)], -1)  # (N, 5, h h)
    m1, m2 = m.sum(-1), (m**2).sum(-1)
    i, c = np.nonzero(m1)
    assert counts.image_concept.tolist() == np.stack([i, c + 1, m1[i, c], m2[i, c]], 1).tolist()
    ring = np.ones((h, h), bool)
    ring[1:-1, 1:-1] = False
    assert counts.ring_area.tolist() == per_cell[..., ring.reshape(-1)].sum((0, 2)).tolist()
    assert counts.cells == h * h and counts.ring_pixels == int(ring.reshape(-1)[cell].sum())


# --------------------------------------------------------------------------- planted truths

CROSS, SQUARE = SHAPES.index("cross"), SHAPES.index("square")
STRIPES = TEXTURES.index("stripes")
# classes of the hand-built classifier: cross/striped, cross/other, square/striped, square/other
CLASSES = {"cross": [0, 1], "square": [2, 3], "stripes": [0, 2]}


class Planted(nn.Module):
    """Three input maps from the images' ground truth: the cross mask, 'this image is striped' everywhere
    (times 1 + a small per-image value, so the top quantile takes whole images), and the frame."""

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        n, size = seg.shape[0], seg.shape[-1]
        cross = (seg[:, 0] == CROSS + 1).float()
        striped = (seg[:, 2] == STRIPES + 1).float().amax((1, 2))
        jitter = 1 + 0.01 * torch.arange(n, dtype=torch.float32).remainder(7)
        frame = torch.zeros(size, size)
        frame[:4], frame[-4:], frame[:, :4], frame[:, -4:] = 1, 1, 1, 1
        maps = [cross, (striped * jitter)[:, None, None].expand(n, size, size), frame * jitter[:, None, None]]
        return torch.stack(maps, 1)


def planted_net() -> nn.Sequential:
    """Units at ``act`` (8x8 on 32 px): 0 = cross, 1 = striped image, 2 = frame; then a 4-class head reading
    f0 = cross present, f1 = striped: logits (2 f0 + f1, 2 f0 - f1 + 1, -2 f0 + f1 + 1, -2 f0 - f1 + 2)."""
    fc, conv = nn.Linear(3, 4), nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3)[:, :, None, None])  # the identity: the ablation finds its units through it
        conv.bias.zero_()
        fc.weight.copy_(torch.tensor([[2.0, 1, 0], [2, -1, 0], [-2, 1, 0], [-2, -1, 0]]))
        fc.bias.copy_(torch.tensor([0.0, 1, 1, 2]))
    return nn.Sequential(OrderedDict(maps=Planted(), pool=nn.MaxPool2d(4), conv=conv, act=nn.ReLU(),
                                     gmax=nn.AdaptiveMaxPool2d(1), flat=nn.Flatten(), fc=fc)).eval()


@pytest.fixture(scope="module")
def planted():
    model = planted_net()
    d = make_shapes(240, 32, seed=5)
    data = ShapesConcepts(d.images, d.segmentation)  # concept label maps; the net reads the per-category maps
    batches = [(d.segmentation[i : i + 80].float(), data.labels[i : i + 80]) for i in range(0, 240, 80)]
    result = dissect_layer(model, "act", batches, data.concepts, device="cpu", quantile=0.05, iou_threshold=0.1)
    return model, result.units.set_index("unit")


def classified(n: int, seed: int):
    """Cross and square images of the shapes data, as the planted net's input, with its four classes."""
    d = make_shapes(n, 32, seed)
    keep = (d.labels // len(TEXTURES) == CROSS) | (d.labels // len(TEXTURES) == SQUARE)
    kind, texture = d.labels[keep] // len(TEXTURES), d.labels[keep] % len(TEXTURES)
    y = 2 * (kind == SQUARE).long() + (texture != STRIPES).long()
    return [(d.segmentation[keep].float(), y)]


def test_a_unit_firing_exactly_on_crosses_beats_its_null(planted):
    _, units = planted
    cross = units.loc[0]
    assert cross["label"] == "cross" and cross["detector"] and cross["q_value"] < 1e-6
    assert cross["iou"] > 3 * cross["iou_null"] and not cross["positional"]


def test_a_unit_firing_everywhere_on_striped_images_gets_no_spatial_label(planted):
    _, units = planted
    striped = units.loc[1]
    assert striped["label"] == "stripes" and striped["iou"] >= 0.1  # the IoU-only rule would call it a detector
    assert striped["q_value"] >= 0.05 and not striped["detector"]
    assert striped["iou_null"] == pytest.approx(striped["iou"], rel=1e-9)  # the null reaches its IoU exactly


def test_a_unit_firing_on_the_frame_is_flagged_positional(planted):
    _, units = planted
    frame = units.loc[2]
    assert frame["positional"] and frame["border_share"] == 1.0
    assert frame["border_expected"] == pytest.approx(28 / 64)
    assert not units.loc[0, "positional"] and not units.loc[1, "positional"]


def test_the_join_reports_the_cross_units_effect_on_cross_classes_only(planted):
    model, units = planted
    test, val = classified(600, seed=11), classified(300, seed=12)
    assert torch.equal(model(test[0][0]).argmax(1), test[0][1])  # the head is right on every image
    counts = ablate_units(model, "act", test, device="cpu", num_classes=4)
    joined = unit_effects(units.reset_index(), counts, CLASSES).set_index("unit")
    cross_images = int((test[0][1] < 2).sum())
    row = joined.loc[0]
    assert row["in_images"] == cross_images and row["in_change_pt"] == -100.0 and row["in_q"] < 1e-6
    assert row["out_change_pt"] == 0.0 and row["out_p"] == 1.0
    plan = group_plan(units.reset_index(), ablate_units(model, "act", val, device="cpu", num_classes=4), CLASSES)
    # unit 1 also damages the cross classes (cross/striped images turn cross/other): second by damage
    assert [(iv.selection, iv.units) for iv in plan] == [("detectors:cross", (0,)), ("top1:cross", (0,)),
                                                         ("top2:cross", (0, 1))]
    removed = intervention_counts(model, "act", test, plan, device="cpu", num_classes=4)
    assert removed.lost[0, :2].sum() == cross_images and removed.lost[0, 2:].sum() == 0  # exactly those classes
    assert removed.gained[0].sum() == 0
    groups = group_effects(removed, CLASSES)
    per_class = group_class_effects(removed, CLASSES).query("group == 'detectors'").set_index("class")
    assert per_class["change_pt"].tolist() == [-100.0, -100.0, 0.0, 0.0] and per_class["in_concept"].tolist() == [
        True, True, False, False]
    assert (per_class["q"][:2] < 1e-6).all() and (per_class["p"][2:] == 1.0).all()
    assert groups.loc[0, "in_change_pt"] == -100.0 and groups.loc[0, "out_change_pt"] == 0.0
    line = headline(groups, units.reset_index())
    assert line.startswith("join: removing the 1 'cross' detector(s) together: cross classes -100.0 pt (q = ")
    assert "other classes +0.0 pt (q = 1, not significant)" in line
