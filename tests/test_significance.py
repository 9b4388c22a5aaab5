"""Every ablation and intervention effect carries a paired exact test against the unmodified model.

The reference here is a hand-built network whose decision hangs on one conv5_3
unit: removing it must be significant, removing a unit with no path to the
logits must not, and the p-values must be scipy's exact binomial test on the
discordant images, counted in this file image by image with a hook.
"""

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from analysis.ablation import ablate_units, precision_differences
from analysis.intervention import Intervention, intervention_counts, intervention_table
from analysis.rankings import class_accuracy, rank_units
from tests.unit_nets import NUM_CLASSES, calibrated_vgg, images
from trainables.models import vgg16

DECISIVE, IDLE = 3, 7  # conv5_3 units: the one the decision hangs on, one with no path to the logits


@pytest.fixture(scope="module")
def planted():
    """A VGG-16 whose prediction is class 0 when unit DECISIVE's pool5 value exceeds its median, else class 1.

    Trunk: calibrated random conv layers (so pool5 varies over images). Head: fc6 copies
    unit DECISIVE into hidden 0 and a constant threshold t into hidden 1 (bias); fc7 passes
    both on; fc8 reads class 0 from hidden 0 and class 1 from hidden 1. Labels are the
    baseline's own predictions except for a few flipped ones, so the baseline is not perfect.
    """
    x = images(n=60, seed=4)
    model = calibrated_vgg(x, "cifar", batch_norm=False, seed=3)
    with torch.no_grad():
        trunk = model[: list(dict(model.named_children())).index("pool5") + 1]
        act = trunk(x).flatten(1)[:, DECISIVE]  # (N,) unit DECISIVE after pool5 (1x1)
        s = act.sort().values
        t = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2  # between two images: no tie at the threshold
        for fc in (model.fc6, model.fc7, model.fc8):
            fc.weight.zero_()
            fc.bias.zero_()
        model.fc6.weight[0, DECISIVE] = 1.0
        model.fc6.bias[1] = t
        model.fc7.weight[0, 0] = model.fc7.weight[1, 1] = 1.0
        model.fc8.weight[0, 0] = model.fc8.weight[1, 1] = 1.0
        pred = model(x).argmax(1)
    assert set(pred.tolist()) == {0, 1} and (act > t).sum() >= 20, "half the images hang on the unit"
    y = pred.clone()
    y[:4] = 2  # four images no model here gets right
    return model.eval(), [(x[:32], y[:32]), (x[32:], y[32:])]


def per_image_hits(model, batches, unit):
    """(baseline hits, hits with ``unit`` zeroed after relu5_3), image by image, by a hand-written hook."""
    def zero(_m, _i, out):
        out = out.clone()
        out[:, unit] = 0
        return out

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        base = model(x).argmax(1) == y
        handle = model.relu5_3.register_forward_hook(zero)
        try:
            ablated = model(x).argmax(1) == y
        finally:
            handle.remove()
    return base, ablated, y


def test_removing_the_decisive_unit_is_significant_and_an_idle_unit_is_not(planted):
    model, batches = planted
    counts = ablate_units(model, "conv5_3", batches, device="cpu", num_classes=NUM_CLASSES, dtype=torch.float64)
    ranked = rank_units(counts).set_index("unit")
    assert ranked.loc[DECISIVE, "change"] < -0.3 and ranked.loc[DECISIVE, "p_value"] < 0.05
    assert ranked.loc[DECISIVE, "q_value"] < 0.05 and ranked.loc[DECISIVE, "significant"]
    assert ranked.loc[IDLE, "change"] == 0 and ranked.loc[IDLE, "p_value"] > 0.05
    assert not ranked.loc[IDLE, "significant"]
    assert ranked.loc[DECISIVE, "ci_high"] < 0 < ranked.loc[IDLE, "ci_high"]


def test_discordant_counts_and_p_values_equal_a_per_image_reference_and_scipy(planted):
    model, batches = planted
    counts = ablate_units(model, "conv5_3", batches, device="cpu", num_classes=NUM_CLASSES, dtype=torch.float64)
    ranked = rank_units(counts).set_index("unit")
    tidy = class_accuracy(counts).set_index(["unit", "class"])
    for unit in (DECISIVE, IDLE, 0, 20):
        base, ablated, y = per_image_hits(model, batches, unit)
        lost, gained = int((base & ~ablated).sum()), int((~base & ablated).sum())
        assert (ranked.loc[unit, "lost"], ranked.loc[unit, "gained"]) == (lost, gained)
        expected = binomtest(min(lost, gained), lost + gained, 0.5).pvalue if lost + gained else 1.0
        assert ranked.loc[unit, "p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
        for k in (0, 1):
            in_k = y == k
            lost_k, gained_k = int((base & ~ablated & in_k).sum()), int((~base & ablated & in_k).sum())
            assert (tidy.loc[(unit, k), "lost"], tidy.loc[(unit, k), "gained"]) == (lost_k, gained_k)
            p_k = binomtest(min(lost_k, gained_k), lost_k + gained_k, 0.5).pvalue if lost_k + gained_k else 1.0
            assert tidy.loc[(unit, k), "p_value"] == pytest.approx(p_k, rel=1e-9, abs=1e-15)


def test_q_values_are_benjamini_hochberg_over_the_units(planted):
    model, batches = planted
    ranked = rank_units(ablate_units(model, "conv5_3", batches, device="cpu", num_classes=NUM_CLASSES))
    p = ranked["p_value"].to_numpy()
    m = len(p)
    naive = [min(min(1.0, m * p[j] / (np.sum(p <= p[j]))) for j in range(m) if p[j] >= p[i]) for i in range(m)]
    assert np.allclose(ranked["q_value"], naive)


def test_table1_rows_carry_the_paired_p_value_against_the_baseline(planted):
    model, batches = planted
    plan = [Intervention("output", "divide", 1e6, (DECISIVE,), "planted"),  # removes it: a large, real effect
            Intervention("output", "multiply", 2.0, (IDLE,), "idle")]  # no path to the logits: no effect
    counts = intervention_counts(model, "conv5_3", batches, plan, device="cpu", num_classes=NUM_CLASSES)
    table = intervention_table(counts).set_index("units")
    assert table.loc["planted", "significant"] and table.loc["planted", "p_value"] < 0.05
    assert not table.loc["idle", "significant"] and table.loc["idle", "p_value"] == 1.0
    base, ablated, _ = per_image_hits(model, batches, DECISIVE)
    lost, gained = int((base & ~ablated).sum()), int((~base & ablated).sum())
    assert table.loc["planted", "p_value"] == pytest.approx(binomtest(min(lost, gained), lost + gained).pvalue)


def test_float32_and_float64_agree_on_a_well_separated_model():
    x = images(n=8, seed=5)
    model = calibrated_vgg(x, "cifar", batch_norm=True, seed=1)
    y = torch.arange(8) % NUM_CLASSES
    pairs, differ = precision_differences(model, "conv5_3", [(x, y)], [0, 1, 2, 3], device="cpu",
                                          num_classes=NUM_CLASSES)
    assert pairs == 8 * 4 and differ == 0


def test_a_near_tie_shows_up_as_a_float32_difference():
    """Logits 2^24 and 2^24 + 1: float32 rounds the second to a tie (argmax takes class 0), float64 picks class 1."""
    model = vgg16("cifar", batch_norm=False, width=0.0625, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for fc in (model.fc6, model.fc7, model.fc8):
            fc.weight.zero_()
            fc.bias.zero_()
        model.fc6.bias[0] = 2.0**24  # hidden 0 = 2^24 whatever the image
        model.fc7.weight[0, 0] = 1.0
        model.fc8.weight[0, 0] = model.fc8.weight[1, 0] = 1.0
        model.fc8.bias[1] = 1.0  # class 1: 2^24 + 1, not representable in float32
    x, y = images(n=2, seed=6), torch.tensor([1, 1])
    pairs, differ = precision_differences(model, "conv5_3", [(x, y)], [0], device="cpu", num_classes=NUM_CLASSES)
    assert pairs == 2 and differ == 2, "float32 ties (argmax takes class 0), float64 picks class 1"
