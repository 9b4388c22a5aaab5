"""Unit interventions: output and weight scaling, model restored, Table 1 protocol."""

import pytest
import torch

from analysis.ablation import ablate_units
from analysis.evaluation import evaluate_class_counts
from analysis.intervention import (
    Intervention,
    InterventionCounts,
    apply_intervention,
    intervention_counts,
    intervention_table,
    run_table1,
    scale_unit_outputs,
    scale_unit_weights,
    scaled_unit_weights,
    table1_interventions,
)
from analysis.rankings import best_units, worst_units
from tests.unit_nets import NUM_CLASSES, calibrated_vgg, images, labelled_batches
from trainables.errors import ConfigError, LayerNameError

F64 = dict(device="cpu", num_classes=NUM_CLASSES, dtype=torch.float64)
UNITS = [1, 4, 9, 30]


@pytest.fixture(scope="module")
def data():
    return images(), images(8, seed=5)


@pytest.fixture(scope="module")
def plain(data):
    """A BN-free cifar VGG in float64 (power-of-two scalings are then exact)."""
    return calibrated_vgg(data[0], "cifar", batch_norm=False).double()


@pytest.fixture(scope="module")
def with_bn(data):
    return calibrated_vgg(data[0], "cifar", batch_norm=True).double()


def _logits(model, x):
    with torch.no_grad():
        return model(x.double())


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before) and all(
        not m._forward_hooks for m in model.modules()
    )


@pytest.mark.exactness
def test_output_scaling_by_one_is_the_identity(plain, data):
    x = data[0]
    ref = _logits(plain, x)
    with scale_unit_outputs(plain, "conv5_3", UNITS, 1.0):
        assert torch.equal(_logits(plain, x), ref)
    with scale_unit_weights(plain, "conv5_3", UNITS, 1.0, bias=True):
        assert torch.equal(_logits(plain, x), ref)


@pytest.mark.exactness
@pytest.mark.parametrize("scale", [2.0, 0.5, 0.25])
def test_weight_and_bias_scaling_equals_output_scaling_without_batchnorm(plain, data, scale):
    # relu(s * (W*x + b)) = s * relu(W*x + b) for s > 0; by a power of two, bit for bit
    x = data[0]
    with scale_unit_outputs(plain, "conv5_3", UNITS, scale):
        by_output = _logits(plain, x)
    with scale_unit_weights(plain, "conv5_3", UNITS, scale, bias=True):
        by_weight = _logits(plain, x)
    assert torch.equal(by_output, by_weight)
    assert not torch.equal(by_output, _logits(plain, x))  # the intervention did something


@pytest.mark.exactness
def test_weight_and_bias_scaling_by_three_equals_output_scaling_up_to_rounding(plain, data):
    x = data[0]
    with scale_unit_outputs(plain, "conv5_3", UNITS, 3.0):
        by_output = _logits(plain, x)
    with scale_unit_weights(plain, "conv5_3", UNITS, 3.0, bias=True):
        by_weight = _logits(plain, x)
    torch.testing.assert_close(by_weight, by_output, rtol=1e-12, atol=1e-12)


def test_weight_scaling_without_bias_is_a_different_intervention(plain, data):
    x = data[0]
    with scale_unit_outputs(plain, "conv5_3", UNITS, 2.0):
        by_output = _logits(plain, x)
    with scale_unit_weights(plain, "conv5_3", UNITS, 2.0, bias=False):
        assert not torch.allclose(_logits(plain, x), by_output)


def test_weight_scaling_with_batchnorm_scales_the_conv_and_leaves_bn_as_it_is(with_bn, data):
    units = torch.tensor(UNITS)
    conv_w, bn = with_bn.conv5_3.weight.clone(), _snapshot(with_bn.bn5_3)
    with scale_unit_weights(with_bn, "conv5_3", UNITS, 2.0) as conv:
        assert conv is with_bn.conv5_3
        assert torch.equal(conv.weight[units], conv_w[units] * 2)
        others = torch.ones(len(conv_w), dtype=torch.bool)
        others[units] = False
        assert torch.equal(conv.weight[others], conv_w[others])
        assert _unchanged(with_bn.bn5_3, bn)
        by_weight = _logits(with_bn, data[0])
    with scale_unit_outputs(with_bn, "conv5_3", UNITS, 2.0):
        assert not torch.allclose(_logits(with_bn, data[0]), by_weight)  # BN: not an output scale


def test_the_model_is_unchanged_after_the_context_managers_exit(with_bn, data):
    before = _snapshot(with_bn)
    with scale_unit_outputs(with_bn, "conv5_3", UNITS, 3.0):
        _logits(with_bn, data[0])
    with scale_unit_weights(with_bn, "conv5_3", UNITS, 3.0, bias=True):
        _logits(with_bn, data[0])
    with pytest.raises(RuntimeError, match="inside"):
        with scale_unit_weights(with_bn, "conv5_3", UNITS, 1 / 3):
            raise RuntimeError("an error inside the block")
    with pytest.raises(RuntimeError, match="inside"):
        with scale_unit_outputs(with_bn, "conv5_3", UNITS, 1 / 3):
            raise RuntimeError("an error inside the block")
    assert _unchanged(with_bn, before)


def test_scaled_unit_weights_returns_a_modified_copy(with_bn):
    before = _snapshot(with_bn)
    copy = scaled_unit_weights(with_bn, "conv5_3", UNITS, 0.5, bias=True)
    assert _unchanged(with_bn, before)
    u = torch.tensor(UNITS)
    assert torch.equal(copy.conv5_3.weight[u], before["conv5_3.weight"][u] * 0.5)
    assert torch.equal(copy.conv5_3.bias[u], before["conv5_3.bias"][u] * 0.5)


@pytest.mark.exactness
def test_intervention_counts_match_evaluating_under_each_intervention(with_bn, data):
    batches = labelled_batches(with_bn, data[0])
    plan = [
        Intervention("output", "divide", 2, UNITS),
        Intervention("weight", "multiply", 3, UNITS),
        Intervention("weight", "divide", 3, [0, 2], bias=True),
        Intervention("output", "multiply", 4, list(range(32))),
    ]
    counts = intervention_counts(with_bn, "conv5_3", batches, plan, **F64)
    assert torch.equal(counts.baseline_correct, evaluate_class_counts(with_bn, batches, **F64).correct)
    for row, iv in enumerate(plan):
        with apply_intervention(with_bn, "conv5_3", iv):
            assert torch.equal(counts.correct[row], evaluate_class_counts(with_bn, batches, **F64).correct), iv.name
    assert (counts.correct.sum(1) != counts.baseline_correct.sum()).any()  # not vacuous


@pytest.mark.exactness
def test_intervention_counts_over_data_shards_add_up(plain, data):
    batches = labelled_batches(plain, data[0])
    plan = table1_interventions([1, 2], [3, 4], factors=(2, 3))
    whole = intervention_counts(plain, "conv5_3", batches, plan, **F64)
    summed = intervention_counts(plain, "conv5_3", batches[:1], plan, **F64) + intervention_counts(
        plain, "conv5_3", batches[1:], plan, **F64
    )
    assert torch.equal(summed.correct, whole.correct) and torch.equal(summed.total, whole.total)
    back = InterventionCounts.from_state_dict(whole.state_dict())
    assert back.interventions == plan and torch.equal(back.correct, whole.correct)


def _synthetic(accuracies, baseline, factors=(2, 3, 4)):
    """Counts over 10 images of one class: ``accuracies`` per (series, factor), in plan order."""
    plan = [Intervention("output", "divide", f, [0], "worst-1") for f in factors]
    correct = torch.tensor([[round(a * 10)] for a in accuracies])
    base = torch.tensor([round(baseline * 10)])
    lost = (base[None] - correct).clamp(min=0)  # fewest discordant images
    return InterventionCounts("conv5_3", plan, correct, torch.tensor([10]), base, lost)


def test_the_table_stops_after_the_first_factor_below_the_selection_baseline():
    selection = _synthetic([0.8, 0.6, 0.9], baseline=0.7)  # /3 falls below: /4 is never tried
    report = _synthetic([0.5, 0.4, 0.3], baseline=0.6)
    table = intervention_table(report, selection)
    assert list(table.factor) == [2.0, 3.0]
    assert list(table.accuracy) == [0.5, 0.4] and set(table.baseline) == {0.6}
    assert list(table.selection_accuracy) == [0.8, 0.6] and list(table.below_baseline) == [False, True]
    assert {"intervention", "units", "operation", "factor", "accuracy", "baseline"} <= set(table.columns)
    # without a separate selection split the report images decide (the paper's way)
    assert list(intervention_table(report).factor) == [2.0]


def test_table1_selects_units_on_one_split_and_reports_on_another(with_bn, data):
    x_select, x_report = data
    selection = labelled_batches(with_bn, x_select)
    report = labelled_batches(with_bn, x_report, sizes=(8,))
    table = run_table1(with_bn, "conv5_3", selection_batches=selection, report_batches=report, k=3,
                       factors=(2, 3), **F64)
    ablation = ablate_units(with_bn, "conv5_3", selection, **F64)
    worst, best = worst_units(ablation, 3), best_units(ablation, 3)
    assert best.units and not worst.units, "on these 12 images removing a unit only ever loses"
    assert set(table.units) == {best.label}, "an empty selection has no rows"
    assert set(table[table.units == best.label].unit_ids) == {" ".join(map(str, best.units))}
    assert set(table.intervention) == {"output", "weight"} and set(table.operation) == {"divide", "multiply"}
    assert set(table.baseline) == {evaluate_class_counts(with_bn, report, **F64).accuracy}
    assert set(table.selection_baseline) == {evaluate_class_counts(with_bn, selection, **F64).accuracy}
    for _, series in table.groupby(["units", "intervention", "operation"]):
        below = list(series.below_baseline)
        assert not any(below[:-1])  # only the last row of a series may be below baseline


def test_bad_intervention_inputs_are_one_clear_error(plain, data):
    with pytest.raises(LayerNameError, match="unknown layer 'conv6_1'"):
        with scale_unit_outputs(plain, "conv6_1", UNITS, 2.0):
            pass
    with pytest.raises(ConfigError, match="unit 99 is out of range"):
        with scale_unit_weights(plain, "conv5_3", [99], 2.0):
            pass
    with pytest.raises(ConfigError, match="factor must be > 0"):
        Intervention("output", "divide", 0, UNITS)
    with pytest.raises(ConfigError, match="not fed by a conv layer"):
        with scale_unit_weights(plain, "relu6", [0], 2.0):
            pass
    assert all(not m._forward_hooks for m in plain.modules())
