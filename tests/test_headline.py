"""One set of headline numbers (study.headline), the parameters each run carries, and what an epoch cost.

Pure functions on hand-built histories, configs and frames: no Ray, no training.
"""

import json
import math

import pandas as pd
import pytest
import torch

from study.analysis_runs import analysis_settings, trial_values
from study.config import load_config
from study.headline import checkpoint_selected, peak_metrics, selected_metrics
from study.mlflow_ui import trials_view
from study.report import config_columns, left_out_note
from study.sweep import asha_milestones
from trainables.resources import EpochResources, peak_rss_mb

from .conftest import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def epoch(e, val, test, images=500, split=500):
    return {"epoch": e, "val/acc": val, "test/acc": test, "test/images": images, "test/split_images": split}


def test_the_selected_epoch_is_the_last_and_its_test_accuracy_only_when_on_the_whole_split():
    # the trial: best validation at epoch 23 (0.9975), the last epoch 30 reads 0.9925 / 0.996
    history = [epoch(e, 0.9, 0.9, images=100) for e in range(22)] + [epoch(22, 0.9975, 0.99, images=100)]
    history += [epoch(e, 0.99, 0.99, images=100) for e in range(23, 29)] + [epoch(29, 0.9925, 0.996)]
    assert selected_metrics(history) == {"selected/epoch": 30, "selected/val_acc_pct": 99.25,
                                         "selected/test_acc_pct": 99.6}
    assert selected_metrics(history[:23]) == {"selected/epoch": 23, "selected/val_acc_pct": 99.75}, \
        "a test accuracy on a head of the test split is no headline number"
    # read back from MLflow (no image counts): whole only at the configured last epoch
    bare = [{"epoch": 29, "val/acc": 0.9925, "test/acc": 0.996}]
    assert selected_metrics(bare, epochs=30)["selected/test_acc_pct"] == 99.6
    assert "selected/test_acc_pct" not in selected_metrics(bare, epochs=40)
    assert selected_metrics([]) == {}


def test_accuracies_that_differ_in_the_third_decimal_never_print_as_equal():
    a, b = selected_metrics([epoch(0, 0.996, 0.996)]), selected_metrics([epoch(0, 0.9975, 0.9975)])
    assert a["selected/val_acc_pct"] != b["selected/val_acc_pct"]
    assert f"{a['selected/val_acc_pct']:.2f}" == "99.60" and f"{b['selected/val_acc_pct']:.2f}" == "99.75"


def test_the_peak_is_the_first_epoch_that_reached_the_highest_validation_accuracy():
    assert peak_metrics({1: 0.5, 2: 0.8, 3: 0.8, 4: 0.7}) == {"peak/val_acc_pct": 80.0, "peak/epoch": 2}
    assert peak_metrics({}) == {}


def test_an_analysis_reads_the_epoch_of_its_checkpoint_from_the_checkpoint_itself():
    history = [epoch(0, 0.5, 0.4, images=100), epoch(1, 0.6, 0.55, images=100), epoch(2, 0.7, 0.65)]
    checkpoint = {"model": {}, "epoch": 1, "history": history, "config": {"train": {"epochs": 3}}}
    assert checkpoint_selected(checkpoint) == {"selected/epoch": 2, "selected/val_acc_pct": 60.0}
    assert checkpoint_selected({**checkpoint, "epoch": 2}) == {
        "selected/epoch": 3, "selected/val_acc_pct": 70.0, "selected/test_acc_pct": 65.0}
    assert checkpoint_selected({"model": {}, "epoch": 4}) == {"selected/epoch": 5}, "no history: the epoch alone"
    assert checkpoint_selected({"conv1_1.weight": torch.zeros(1)}) == {}, "a bare state dict says nothing"


@pytest.mark.parametrize("epochs, grace, factor", [(30, 10, 2), (30, 10, 3), (2, 1, 2), (27, 3, 1.5), (50, 7, 2.5)])
def test_the_whole_test_split_is_tested_at_every_epoch_where_asha_may_stop_a_trial(epochs, grace, factor):
    from ray.tune.schedulers import ASHAScheduler

    cfg = load_config(QUICKSTART, [f"train.epochs={epochs}", f"sweep.grace_period={grace}",
                                   f"sweep.reduction_factor={factor}"])
    asha = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=grace, reduction_factor=factor)
    # a rung at m judges a trial at its first result with training_iteration >= m, i.e. after epoch ceil(m)
    judged = sorted({math.ceil(m) for m, _ in asha._brackets[0]._rungs})
    assert asha_milestones(cfg) == judged
    assert asha_milestones(load_config(QUICKSTART, ["sweep.scheduler=fifo"])) == []


def test_analysis_runs_log_only_their_own_settings_without_none_and_the_quantile_is_not_q():
    cfg = load_config(QUICKSTART, ["ablation.units=[1, 2]"])
    ablation, intervention = analysis_settings(cfg, "ablation"), analysis_settings(cfg, "intervention")
    assert ablation == {"ablation.layer": "conv3_3", "ablation.units": "1,2", "ablation.dtype": "float32",
                        "ablation.precision_sample": 64}
    assert intervention["intervention.top_k"] == 5 and intervention["intervention.factors"] == "2.0,3.0"
    assert not any(k.startswith("ablation.") for k in intervention), "an intervention's settings are its own"
    dissection = analysis_settings(cfg, "dissection")
    assert dissection["dissection.top_quantile"] == 0.05 and "dissection.quantile" not in dissection
    assert not {"dissection.broden_root", "dissection.seed", "dissection.split"} & set(dissection), "shapes: none"
    assert None not in dissection.values() and "dissection.denominator" not in dissection, "unset: left out"
    broden = analysis_settings(load_config(QUICKSTART, ["dissection.concepts=broden", "dissection.broden_root=/b"]),
                               "dissection")
    assert broden["dissection.broden_root"] == "/b" and broden["dissection.seed"] == 0


class _Run:
    def __init__(self, params, tags):
        self.data = type("D", (), {"params": params, "tags": tags})()


def test_an_analysis_names_the_trial_s_swept_values_under_trial():
    swept = {"par_rate": "regularization.focused_dropout.par_rate", "lambda": "regularization.gradient_penalty.lambda"}
    run = _Run({"par_rate": "0.06", "lambda": "0.01", "train.lr": "0.05"}, {"swept": json.dumps(swept),
                                                                           "method": "fd"})
    assert trial_values(run) == {"trial.par_rate": "0.06", "trial.lambda": "0.01", "trial.method": "fd"}
    assert trial_values(_Run({"train.lr": "0.05"}, {})) == {} and trial_values(None) == {}


def test_table2_reads_a_trial_s_short_keys_back_under_their_config_paths():
    swept = json.dumps({"dropout.rate": "regularization.dropout.rate"})
    runs = pd.DataFrame({"tags.swept": [swept, None], "params.dropout.rate": ["0.2", None],
                         "params.regularization.dropout.rate": [None, "0.1"]})
    assert config_columns(runs)["params.regularization.dropout.rate"].tolist() == ["0.2", "0.1"]
    assert left_out_note({"stopped_early": 2})[0].startswith("Left out: 2 trial run(s) stopped early by ASHA")
    assert left_out_note({}) == []


def test_the_trials_view_puts_the_swept_values_then_the_headline_first_at_header_widths():
    swept = ["regularization.focused_dropout.par_rate", "regularization.dropout.rate",
             "regularization.gradient_penalty.lambda"]
    view = trials_view("f" * 32, swept)
    order = view["columnOrder"]
    assert order[:5] == ["params.`par_rate`", "params.`dropout.rate`", "params.`lambda`",
                         "metrics.`selected/val_acc_pct`", "metrics.`selected/test_acc_pct`"]
    assert view["orderByKey"] == "metrics.`selected/val_acc_pct`" and view["orderByAsc"] is False
    widths = view["columnWidths"]
    assert set(widths) == set(order) - {"duration"} and min(widths.values()) >= 64  # seen whole: test_sweep.py
    line, parallel = view["compareRunCharts"]
    assert (line["type"], line["selectedMetricKeys"]) == ("LINE", ["val/acc"])
    assert (parallel["type"], parallel["selectedParams"], parallel["selectedMetrics"]) == \
        ("PARALLEL", ["par_rate", "dropout.rate", "lambda"], ["selected/val_acc_pct"])
    assert {c["metricSectionId"] for c in view["compareRunCharts"]} == {view["compareRunSections"][0]["uuid"]}


def _proc_status_mb(field: str) -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_an_epoch_s_peak_host_memory_is_the_process_high_water_mark():
    """Against Linux's own account (VmHWM), and it rises when the epoch touches memory beyond the old peak."""
    before = peak_rss_mb()
    with EpochResources(torch.device("cpu")) as cost:
        above = _proc_status_mb("VmHWM") - _proc_status_mb("VmRSS") + 32  # MiB that lift the peak by ~32
        block = torch.ones(int(above * 2**18), dtype=torch.float32)
        del block
    got = cost.metrics()
    assert set(got) == {"system/peak_rss_mb"}, "on the CPU no GPU metric is made up"
    assert got["system/peak_rss_mb"] == pytest.approx(_proc_status_mb("VmHWM"), abs=1)
    assert got["system/peak_rss_mb"] >= before + 24


@pytest.mark.gpu
def test_an_epoch_s_peak_gpu_memory_counts_the_tensors_it_held():
    device = torch.device("cuda")
    with EpochResources(device) as cost:
        block = torch.ones(256 * 2**20 // 4, device=device)  # 256 MiB
        del block
    got = cost.metrics()
    assert 256 <= got["system/peak_gpu_memory_mb"] < 256 + 64
    with EpochResources(device) as cost:
        pass
    assert cost.metrics()["system/peak_gpu_memory_mb"] < 64, "reset at each epoch's start"
