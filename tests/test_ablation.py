"""Per-unit ablation: the fast path computes exactly what the naive loop computes.

Fast and naive runs compare in float64: the fast path subtracts the unit's
contribution from fc6's pre-activation (``z - W_u p_u``) where the naive loop
recomputes ``W p'``, a different order of additions, and in float32 an image
whose two top logits nearly tie could flip its argmax. In float64 the rounding
differences (~1e-16 relative) are far below any margin these models produce.
"""

import pytest
import torch
from torch import nn

import analysis.ablation as ablation_module
from analysis.ablation import ablate_unit_set, ablate_units, ablate_units_naive
from analysis.counts import AblationCounts, ClassCounts
from analysis.evaluation import evaluate_class_counts, model_from_state_dict
from analysis.hooks import edit_layers, retain_layers, zero_units
from analysis.rankings import best_units, class_accuracy, rank_units, rank_units_per_class, unit_accuracy, worst_units
from tests.unit_nets import NUM_CLASSES, calibrated_vgg, images, labelled_batches, min_relative_margin
from trainables.checkpoint import load_checkpoint
from trainables.errors import CheckpointError, ConfigError, DataError, LayerNameError
from trainables.models import load_vgg16_state_dict, vgg16

F64 = dict(device="cpu", num_classes=NUM_CLASSES, dtype=torch.float64)


@pytest.fixture(scope="module")
def nets():
    """(model, batches) for the cifar variant without and with BN and a small places365 variant."""
    x = images()
    out = {}
    for key, (variant, bn) in {"cifar": ("cifar", False), "cifar-bn": ("cifar", True),
                               "places365": ("places365", False)}.items():
        model = calibrated_vgg(x, variant, bn)
        out[key] = (model, labelled_batches(model, x))
    return out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- fast == naive


@pytest.mark.exactness
@pytest.mark.parametrize("net", ["cifar", "cifar-bn", "places365"])
def test_fast_ablation_matches_naive_loop_for_every_unit(nets, net):
    model, batches = nets[net]
    fast = ablate_units(model, "conv5_3", batches, **F64)
    naive = ablate_units_naive(model, "conv5_3", batches, **F64)
    assert torch.equal(fast.units, torch.arange(32)) and torch.equal(naive.units, fast.units)
    assert torch.equal(fast.correct, naive.correct) and torch.equal(fast.lost, naive.lost)
    assert torch.equal(fast.baseline_correct, naive.baseline_correct)
    assert torch.equal(fast.total, naive.total) and fast.num_images == 12
    # on every machine: float64's two summation orders differ by ~1e-16 relative, far below these margins
    assert min_relative_margin(model, "conv5_3", batches) > 1e-9
    # not vacuous: ablations change predictions, and both skipped and recomputed pairs occur
    assert (fast.correct != fast.baseline_correct).any(1).sum() >= 5
    fc6_input = "avgpool" if net == "places365" else "pool5"
    with torch.no_grad(), retain_layers(model, [fc6_input]) as kept:
        model(torch.cat([x for x, _ in batches]))
    dead = kept[fc6_input].flatten(2).eq(0).all(-1).float().mean()
    assert 0.1 < dead < 0.9


@pytest.mark.exactness
@pytest.mark.parametrize("share", [0.0, 2.0], ids=["all-pairs", "live-pairs-only"])
def test_running_all_pairs_or_only_live_pairs_gives_the_same_counts(nets, share, monkeypatch):
    model, batches = nets["cifar-bn"]
    monkeypatch.setattr(ablation_module, "_DENSE_SHARE", share)
    fast = ablate_units(model, "conv5_3", batches, **F64)
    assert torch.equal(fast.correct, ablate_units_naive(model, "conv5_3", batches, **F64).correct)


@pytest.mark.exactness
def test_fast_ablation_matches_naive_loop_at_a_deeper_layer(nets):
    model, batches = nets["cifar-bn"]
    fast = ablate_units(model, "conv4_3", batches, **F64)  # pool4 -> conv5_1: the generic batched path
    naive = ablate_units_naive(model, "conv4_3", batches, **F64)
    assert torch.equal(fast.correct, naive.correct)
    assert (fast.correct != fast.baseline_correct).any(1).sum() >= 3


@pytest.mark.parametrize("layer", ["bn5_3", "pool5", "pool4", "relu6"])
def test_explicit_module_names_are_ablated_where_named(nets, layer):
    model, batches = nets["cifar-bn"]
    units = [0, 3, 17, 31]
    fast = ablate_units(model, layer, batches, units, **F64)
    assert torch.equal(fast.correct, ablate_units_naive(model, layer, batches, units, **F64).correct)


def test_conv5_3_means_its_units_after_relu5_3(nets):
    model, batches = nets["cifar-bn"]
    by_conv = ablate_units(model, "conv5_3", batches, **F64)
    by_relu = ablate_units(model, "relu5_3", batches, **F64)
    assert torch.equal(by_conv.correct, by_relu.correct)
    # and the naive definition: a hook zeroing channel u of relu5_3's output
    u = 5
    handle = model.relu5_3.register_forward_hook(lambda m, i, o: o.index_fill(1, torch.tensor([u]), 0))
    try:
        hooked = evaluate_class_counts(model, batches, **F64)
    finally:
        handle.remove()
    assert torch.equal(by_conv.correct[u], hooked.correct)


@pytest.mark.exactness
def test_chunk_size_does_not_change_the_counts(nets):
    model, batches = nets["places365"]
    ref = ablate_units(model, "conv5_3", batches, **F64)
    for chunk in (1, 7, 100):
        assert torch.equal(ablate_units(model, "conv5_3", batches, chunk=chunk, **F64).correct, ref.correct)


@pytest.mark.exactness
@pytest.mark.parametrize("layer", ["conv5_3", "conv4_3"])
@pytest.mark.parametrize("units", ["all", "some"])
def test_ablating_a_set_of_units_together_equals_zeroing_those_channels(nets, layer, units):
    model, batches = nets["cifar"]
    chosen = list(range(32)) if units == "all" else [1, 4, 9, 30]
    relu = getattr(model, layer.replace("conv", "relu"))

    def zero(_m, _i, out):  # independent of analysis.hooks: zero the channels by hand
        out = out.clone()
        out[:, chosen] = 0
        return out

    handle = relu.register_forward_hook(zero)
    try:
        expected = evaluate_class_counts(model, batches, **F64)
    finally:
        handle.remove()
    got = ablate_unit_set(model, layer, batches, chosen, **F64)
    assert torch.equal(got.correct, expected.correct) and torch.equal(got.total, expected.total)


@pytest.mark.gpu
def test_fast_ablation_matches_naive_loop_on_cuda(nets):
    model, batches = nets["places365"]
    kw = dict(device="cuda", num_classes=NUM_CLASSES, dtype=torch.float64)
    fast = ablate_units(model, "conv5_3", batches, **kw)
    assert torch.equal(fast.correct, ablate_units_naive(model, "conv5_3", batches, **kw).correct)
    assert torch.equal(fast.correct, ablate_units(model, "conv5_3", batches, **F64).correct)


# --------------------------------------------------------------------------- hooks


def test_retain_layers_keeps_the_named_outputs_and_removes_its_hooks(nets):
    model, batches = nets["cifar-bn"]
    x = batches[0][0]
    with torch.no_grad(), retain_layers(model, ["conv5_3", "relu5_3"]) as kept:
        model(x)
    assert torch.equal(kept["relu5_3"], torch.relu(model.bn5_3(kept["conv5_3"])).detach())
    assert all(not m._forward_hooks for m in model.modules())


def test_edit_layers_checks_every_name_before_hooking_anything(nets):
    model, _ = nets["cifar"]
    with pytest.raises(LayerNameError, match="unknown layer 'relu9_9'"):
        with edit_layers(model, {"relu5_3": zero_units([0]), "relu9_9": zero_units([0])}):
            pass
    assert all(not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------- merging


@pytest.mark.exactness
def test_shards_over_data_sum_to_a_single_pass(nets):
    model, batches = nets["cifar"]
    whole = ablate_units(model, "conv5_3", batches, **F64)
    shards = [ablate_units(model, "conv5_3", [b], **F64) for b in batches]
    summed = shards[0] + shards[1]
    for field in ("units", "correct", "total", "baseline_correct"):
        assert torch.equal(getattr(summed, field), getattr(whole, field))


@pytest.mark.exactness
def test_unit_chunks_concatenate_to_all_units(nets):
    model, batches = nets["cifar"]
    whole = ablate_units(model, "conv5_3", batches, **F64)
    chunks = [ablate_units(model, "conv5_3", batches, list(r), **F64) for r in (range(20, 32), range(0, 20))]
    joined = AblationCounts.concat(chunks)
    assert torch.equal(joined.units, whole.units) and torch.equal(joined.correct, whole.correct)


@pytest.mark.exactness
def test_merge_reduces_a_grid_of_unit_chunks_and_data_shards(nets):
    model, batches = nets["cifar"]
    whole = ablate_units(model, "conv5_3", batches, **F64)
    grid = [
        ablate_units(model, "conv5_3", [b], list(r), **F64) for r in (range(0, 10), range(10, 32)) for b in batches
    ]
    merged = AblationCounts.merge(reversed(grid))
    for field in ("units", "correct", "total", "baseline_correct", "lost"):
        assert torch.equal(getattr(merged, field), getattr(whole, field))


def test_counts_survive_a_round_trip_through_torch_save_with_weights_only(nets, tmp_path):
    model, batches = nets["cifar"]
    counts = ablate_units(model, "conv5_3", batches, [2, 7], **F64)
    torch.save(counts.state_dict(), tmp_path / "counts.pt")
    back = AblationCounts.from_state_dict(torch.load(tmp_path / "counts.pt", weights_only=True))
    assert back.layer == "conv5_3"
    for field in ("units", "correct", "total", "baseline_correct", "lost"):
        assert torch.equal(getattr(back, field), getattr(counts, field))


def _counts(units, correct, total, baseline, layer="conv5_3"):
    """Counts as if no image went from wrong to right where a class lost accuracy (fewest discordant images)."""
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    lost = (t(baseline)[None] - t(correct)).clamp(min=0)
    return AblationCounts(layer, t(units), t(correct), t(total), t(baseline), lost)


def test_merging_refuses_parts_that_do_not_fit_together():
    a = _counts([0, 1], [[1, 2], [3, 4]], [5, 5], [2, 2])
    with pytest.raises(ConfigError, match="overlap"):
        AblationCounts.concat([a, a])
    with pytest.raises(ConfigError, match="units"):
        a + _counts([0, 2], [[1, 2], [3, 4]], [5, 5], [2, 2])
    with pytest.raises(ConfigError, match="data"):
        AblationCounts.concat([a, _counts([2], [[1, 1]], [6, 5], [2, 2])])
    with pytest.raises(ConfigError, match="layers"):
        a + _counts([0, 1], [[1, 2], [3, 4]], [5, 5], [2, 2], layer="conv4_3")


# --------------------------------------------------------------------------- the model is left alone


def test_ablation_leaves_the_model_unchanged(nets):
    model, batches = nets["cifar-bn"]
    before = _state(model)
    model.train()
    try:
        ablate_units(model, "conv5_3", batches, device="cpu", num_classes=NUM_CLASSES)  # same dtype: no copy
        ablate_units_naive(model, "conv5_3", batches, [0, 1], device="cpu", num_classes=NUM_CLASSES)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.exactness
def test_float32_fast_ablation_agrees_with_the_naive_loop_where_no_logits_nearly_tie(nets):
    """In float32 the two paths' logits differ by about 1e-6 relative; no image here has its top two logits
    within 1e-4 of each other (under any single-unit ablation), so their predictions agree on any machine."""
    model, batches = nets["cifar"]
    assert min_relative_margin(model, "conv5_3", batches) > 1e-4
    kw = dict(device="cpu", num_classes=NUM_CLASSES)
    fast = ablate_units(model, "conv5_3", batches, **kw)
    assert torch.equal(fast.correct, ablate_units_naive(model, "conv5_3", batches, **kw).correct)


# --------------------------------------------------------------------------- tables and rankings


def test_class_accuracy_table_is_tidy_and_consistent_with_the_counts():
    c = _counts([3, 8], [[1, 4], [2, 0]], [2, 4], [2, 3])
    df = class_accuracy(c, class_names=["cat", "dog"])
    assert list(df.columns) == ["unit", "class", "class_name", "accuracy", "baseline_accuracy", "change",
                                "correct", "total", "lost", "gained", "ci_low", "ci_high", "p_value", "q_value",
                                "significant"]
    assert len(df) == 4
    row = df[(df.unit == 8) & (df["class"] == 1)].iloc[0]
    assert row.class_name == "dog" and row.accuracy == 0.0 and row.baseline_accuracy == 0.75
    assert row.change == -0.75 and row.correct == 0 and row.total == 4


def test_units_are_ranked_by_how_much_their_removal_changes_accuracy():
    # baseline 5/10; unit 0 -> 7/10, unit 1 -> 5/10 (no change), unit 2 -> 2/10, unit 3 -> 4/10
    c = _counts([0, 1, 2, 3], [[4, 3], [3, 2], [2, 0], [1, 3]], [5, 5], [3, 2])
    overall = unit_accuracy(c).set_index("unit")
    assert overall.loc[0, "accuracy"] == 0.7 and overall.loc[2, "change"] == pytest.approx(-0.3)
    assert worst_units(c, 2).units == (0,), "unit 1 does not change accuracy: it never qualifies"
    assert best_units(c, 2).units == (2, 3)
    ranked = rank_units(c)
    assert list(ranked.unit) == [2, 3, 1, 0] and list(ranked["rank"]) == [1, 2, 3, 4]
    assert list(ranked.verdict) == ["neutral"] * 4, "10 images: no change here is significant"
    per_class = rank_units_per_class(c, k=1)
    top = per_class.set_index(["class", "direction"])["unit"]
    # class 0: changes +1/5, 0, -1/5, -2/5; class 1: +1/5, 0, -2/5, +1/5 (units 0 and 3 tie for one place)
    assert top[(0, "raises")] == 0 and top[(0, "lowers")] == 3
    assert top[(1, "lowers")] == 2 and (1, "raises") not in top.index, "a tie is left out, not broken by id"


# --------------------------------------------------------------------------- bad inputs


def test_an_unknown_layer_is_one_error_listing_the_valid_names(nets):
    model, batches = nets["cifar"]
    with pytest.raises(LayerNameError, match=r"unknown layer 'conv5_4' \(did you mean 'conv5_3'\?\); valid names"):
        ablate_units(model, "conv5_4", batches, **F64)


@pytest.mark.parametrize("units, message", [([3, 32], "unit 32 is out of range: 'conv5_3' has 32 units"),
                                            ([-1], "unit -1 is out of range"), ([2, 2], "repeat")])
def test_bad_unit_indices_are_one_clear_error(nets, units, message):
    model, batches = nets["cifar"]
    with pytest.raises(ConfigError, match=message):
        ablate_units(model, "conv5_3", batches, units, **F64)


def test_labels_or_class_counts_that_do_not_fit_the_model_are_one_clear_error(nets):
    model, batches = nets["cifar"]
    with pytest.raises(ConfigError, match="the model has 10 outputs but num_classes is 20"):
        ablate_units(model, "conv5_3", batches, device="cpu", num_classes=20)
    x, y = batches[0]
    with pytest.raises(DataError, match="outside 0..9"):
        ablate_units(model, "conv5_3", [(x, y + 10)], **F64)


def test_a_checkpoint_of_another_architecture_or_class_count_is_a_checkpoint_error():
    cifar = vgg16("cifar", batch_norm=False, width=0.0625, num_classes=10)
    with pytest.raises(CheckpointError, match="does not match this VGG-16"):
        load_vgg16_state_dict(cifar, vgg16("cifar", batch_norm=True, width=0.0625, num_classes=10).state_dict())
    with pytest.raises(CheckpointError, match="another width or class count"):
        load_vgg16_state_dict(cifar, vgg16("cifar", batch_norm=False, width=0.0625, num_classes=20).state_dict())
    with pytest.raises(CheckpointError, match="num_classes=10, but num_classes=365 was expected"):
        model_from_state_dict({"model": cifar.state_dict()}, device="cpu", num_classes=365)
    with pytest.raises(CheckpointError, match="variant=cifar, but variant=places365 was expected"):
        model_from_state_dict(cifar.state_dict(), device="cpu", variant="places365")
    rebuilt = model_from_state_dict({"model": cifar.state_dict()}, device="cpu", num_classes=10, batch_norm=False)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), cifar.state_dict().values()))


def test_a_corrupt_checkpoint_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04 this is not a torch checkpoint")
    with pytest.raises(CheckpointError, match="is not a readable torch checkpoint"):
        load_checkpoint(path)


def test_class_counts_add_up_and_report_accuracy():
    a = ClassCounts(torch.tensor([1, 2]), torch.tensor([2, 2]))
    b = ClassCounts(torch.tensor([1, 0]), torch.tensor([2, 2]))
    s = a + b
    assert torch.equal(s.correct, torch.tensor([2, 2])) and s.accuracy == 0.5
    assert torch.equal(ClassCounts.from_state_dict(s.state_dict()).total, torch.tensor([4, 4]))


def test_a_model_that_is_not_the_flat_named_vgg_is_refused():
    wrapped = nn.Sequential(vgg16("cifar", width=0.0625, num_classes=10))
    with pytest.raises(ConfigError, match="0.conv5_3"):
        ablate_units(wrapped, "conv5_3", [], **F64)
