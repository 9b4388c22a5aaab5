"""`study report`: Table 2 from a seeded MLflow store and a fabricated runs frame, checked against
hand-computed means, t intervals and scipy's paired t test."""

import math

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.tables import accuracy_title, mean_ci, method_of, table2, table2_markdown
from study.config import load_config
from study.report import report
from trainables.errors import ConfigError

from .conftest import ROOT

# (method tag or None, dropout, par_rate, lambda, seed, train acc, test acc, status); no val/acc, as older runs
RUNS = [
    (None, 0.0, 0.0, 0.0, 0, 0.99, 0.70, "finished"),
    (None, 0.0, 0.0, 0.0, 1, 0.97, 0.72, "finished"),
    (None, 0.0, 0.0, 0.0, 2, 0.98, 0.74, "finished"),
    (None, 0.2, 0.0, 0.0, 0, 0.90, 0.60, "finished"),
    (None, 0.2, 0.0, 0.0, 1, 0.92, 0.64, "finished"),
    (None, 0.0, 0.1, 0.0, 0, 0.80, 0.75, "finished"),
    (None, 0.0, 0.1, 0.1, 0, 0.50, 0.10, "stopped_early"),
    ("focused_dropout", 0.0, 0.1, 0.0, 1, 0.10, 0.05, "failed"),
]


@pytest.fixture
def seeded_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("seeded", artifact_location=str(tmp_path / "mlruns"))
    parent = c.create_run(exp, run_name="sweep", tags={"study.kind": "sweep"}).info.run_id
    for i, (tag, rate, par, lam, seed, train_acc, test_acc, status) in enumerate(RUNS):
        tags = {"mlflow.parentRunId": parent, "trial_id": f"t{i}", "status": status}
        if tag:
            tags["method"] = tag
        run = c.create_run(exp, tags=tags).info.run_id
        c.log_param(run, "regularization.dropout.rate", rate)
        c.log_param(run, "regularization.focused_dropout.par_rate", par)
        c.log_param(run, "regularization.gradient_penalty.lambda", lam)
        c.log_param(run, "train.seed", seed)
        for epoch, frac in enumerate((0.5, 1.0)):  # the last logged value is the final one
            c.log_metric(run, "train/acc", train_acc * frac, step=epoch)
            c.log_metric(run, "test/acc", test_acc * frac, step=epoch)
        c.set_terminated(run, "FAILED" if status == "failed" else "FINISHED")
    c.set_terminated(parent, "FINISHED")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"tracking.mlflow_uri={uri}", "tracking.experiment=seeded"])
    return cfg, parent


def test_report_prints_exactly_the_expected_means_and_cis(seeded_store, tmp_path):
    cfg, parent = seeded_store
    r = report(cfg, out_dir=tmp_path / "out")
    t = r.table2.set_index("method")
    assert list(r.table2["method"]) == ["baseline", "dropout", "focused_dropout"]
    # baseline: test 0.70, 0.72, 0.74 -> mean 0.72, s = 0.02, t_{0.975,2} = 4.302653
    assert t.loc["baseline", "n"] == 3
    assert t.loc["baseline", "test_acc"] == pytest.approx(0.72)
    assert t.loc["baseline", "test_acc_ci"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert t.loc["baseline", "train_acc"] == pytest.approx(0.98)
    assert t.loc["baseline", "train_acc_ci"] == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-6)
    # dropout: test 0.60, 0.64 -> mean 0.62, s = 0.028284, t_{0.975,1} = 12.7062
    assert t.loc["dropout", "test_acc"] == pytest.approx(0.62)
    assert t.loc["dropout", "test_acc_ci"] == pytest.approx(12.706205 * math.sqrt(0.0008) / math.sqrt(2), rel=1e-6)
    # a single run has no interval
    assert t.loc["focused_dropout", "n"] == 1 and math.isnan(t.loc["focused_dropout", "test_acc_ci"])
    # dropout - baseline on seeds 0, 1: -0.10, -0.08 -> mean -0.09, s = 0.014142, half 12.706205 * 0.01
    assert t.loc["dropout", "pairs"] == 2 and t.loc["dropout", "test_diff"] == pytest.approx(-0.09)
    assert t.loc["dropout", "test_diff_ci"] == pytest.approx(0.12706205, rel=1e-6)
    assert "| baseline | 3 | 98.00% ± 2.48 | - | 72.00% ± 4.97 | - |" in r.markdown
    assert "| dropout | 2 | 91.00% ± 12.71 | - | 62.00% ± 25.41 | -9.00 ± 12.71 pt (n=2 pairs) |" in r.markdown
    assert "| focused_dropout | 1 | 80.00% | - | 75.00% | +5.00 pt (n=1 pair) |" in r.markdown
    assert r.excluded == {"stopped_early": 1, "failed": 1}
    assert (tmp_path / "out" / "table2.csv").exists() and (tmp_path / "out" / "test_accuracy_per_method.png").exists()
    logged = {a.path for a in MlflowClient(cfg.tracking.mlflow_uri).list_artifacts(parent, "report")}
    assert "report/table2.md" in logged and r.logged_to == parent


def test_method_of_reads_tags_first_then_params():
    row = pd.Series({"params.regularization.dropout.rate": "0.2",
                     "params.regularization.focused_dropout.par_rate": "0.1",
                     "params.regularization.gradient_penalty.lambda": "0.0"})
    assert method_of(row) == "dropout+focused_dropout"
    assert method_of(pd.Series({**row, "tags.method": "custom"})) == "custom"


def test_mean_ci_matches_a_hand_computation():
    mean, half, n = mean_ci(pd.Series([1.0, 2.0, 3.0, 4.0]))
    assert (mean, n) == (2.5, 4)
    assert half == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-6)
    assert table2(pd.DataFrame()).empty


def test_report_on_a_missing_experiment_is_one_clear_error(seeded_store):
    cfg, _ = seeded_store
    with pytest.raises(ConfigError, match="no MLflow experiment 'nope'"):
        report(cfg, experiment="nope")


# test accuracy per seed 0, 1, 2 of four methods; train and val accuracy are test + 0.25 and test + 0.01
GRID = {
    "baseline": ({}, [0.700, 0.712, 0.695]),
    "dropout": ({"params.regularization.dropout.rate": "0.2"}, [0.706, 0.715, 0.709]),
    "focused_dropout": ({"params.regularization.focused_dropout.par_rate": "0.1"}, [0.720, 0.731, 0.716]),
    "input_gradient": ({"params.regularization.gradient_penalty.lambda": "0.1"}, [0.701, 0.722, 0.690]),
}


def _run(params: dict, seed: str, test_acc: float, method_tag: str | None = None) -> dict:
    return {"params.regularization.dropout.rate": "0.0", "params.regularization.focused_dropout.par_rate": "0.0",
            "params.regularization.gradient_penalty.lambda": "0.0", **params, "params.train.seed": seed,
            "tags.method": method_tag, "metrics.train/acc": test_acc + 0.25, "metrics.val/acc": test_acc + 0.01,
            "metrics.test/acc": test_acc}


@pytest.fixture
def grid_runs() -> pd.DataFrame:
    """4 methods x 3 seeds, one method run on seed 1 only, one on seed 7 only; rows shuffled."""
    rows = [_run(params, str(seed), acc) for params, accs in GRID.values() for seed, acc in enumerate(accs)]
    rows += [_run({}, "1", 0.740, "one_seed"), _run({}, "7", 0.650, "unpaired")]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_table2_difference_is_the_paired_t_interval_over_seeds(grid_runs):
    t = table2(grid_runs).set_index("method")
    base = np.array(GRID["baseline"][1])
    for method in ("dropout", "focused_dropout", "input_gradient"):
        acc = np.array(GRID[method][1])
        ci = stats.ttest_rel(acc, base).confidence_interval(0.95)
        row = t.loc[method]
        assert row["pairs"] == 3 and row["n"] == 3
        assert row["test_diff"] == pytest.approx((acc - base).mean(), rel=1e-12)
        assert (row["test_diff"] - row["test_diff_ci"], row["test_diff"] + row["test_diff_ci"]) == pytest.approx(
            (ci.low, ci.high), rel=1e-9)
        assert row["val_acc"] == pytest.approx(acc.mean() + 0.01) and row["val_acc_n"] == 3
    # the same numbers by hand, formatted: focused_dropout - baseline = 0.020, 0.019, 0.021
    half = stats.t.ppf(0.975, 2) * np.std([0.020, 0.019, 0.021], ddof=1) / math.sqrt(3)
    assert f"| +2.00 ± {100 * half:.2f} pt (n=3 pairs) |" in table2_markdown(table2(grid_runs))


def test_table2_gives_one_seed_no_interval_and_unpaired_methods_no_difference(grid_runs):
    t = table2(grid_runs).set_index("method")
    assert list(t.index) == ["baseline", "dropout", "focused_dropout", "input_gradient", "one_seed", "unpaired"]
    one = t.loc["one_seed"]
    assert one["n"] == 1 and math.isnan(one["test_acc_ci"]) and math.isnan(one["test_diff_ci"])
    assert one["pairs"] == 1 and one["test_diff"] == pytest.approx(0.740 - 0.712)
    assert t.loc["unpaired", "pairs"] == 0 and t.loc["baseline", "pairs"] == 0
    lines = table2_markdown(table2(grid_runs)).splitlines()
    assert lines[0] == "| method | n | train acc | val acc | test acc | Δ test acc vs baseline |"
    assert "| one_seed | 1 | 99.00% | 75.00% | 74.00% | +2.80 pt (n=1 pair) |" in lines
    assert "| unpaired | 1 | 90.00% | 66.00% | 65.00% | - |" in lines
    assert lines[2].startswith("| baseline | 3 |") and lines[2].endswith("| - |")


def test_table2_without_a_baseline_has_no_difference_column_values(grid_runs):
    t = table2(grid_runs[grid_runs["params.regularization.dropout.rate"] != "0.0"])
    assert list(t["method"]) == ["dropout"] and t.loc[0, "pairs"] == 0
    assert table2_markdown(t).splitlines()[2].endswith("| - |")


def test_table2_without_val_acc_reads_dash_and_keeps_every_other_column(grid_runs):
    full = table2(grid_runs)
    older = table2(grid_runs.drop(columns="metrics.val/acc"))
    assert older["val_acc"].isna().all() and (older["val_acc_n"] == 0).all()
    val = ["val_acc", "val_acc_ci", "val_acc_n"]
    pd.testing.assert_frame_equal(older.drop(columns=val), full.drop(columns=val))
    assert "| baseline | 3 | 95.23% ± 2.17 | - | 70.23% ± 2.17 | - |" in table2_markdown(older)


def test_table2_marks_an_accuracy_only_some_runs_logged_with_its_count(grid_runs):
    grid_runs.loc[grid_runs["params.train.seed"].eq("0") & grid_runs["tags.method"].isna()
                  & grid_runs["params.regularization.dropout.rate"].eq("0.2"), "metrics.val/acc"] = math.nan
    row = table2(grid_runs).set_index("method").loc["dropout"]
    assert row["val_acc_n"] == 2 and row["val_acc"] == pytest.approx((0.715 + 0.709) / 2 + 0.01)
    assert "(n=2) |" in table2_markdown(table2(grid_runs))


def test_accuracy_title_claims_an_interval_only_when_some_method_has_two_runs(grid_runs):
    title = "Test accuracy per method\n(mean, 95% t interval over seeds where n ≥ 2)"
    assert accuracy_title(table2(grid_runs)) == title
    singles = grid_runs[grid_runs["params.train.seed"] == "1"]
    assert accuracy_title(table2(singles)) == "Test accuracy per method\n(single runs, no interval)"


def test_a_search_s_trials_with_different_values_are_never_pooled_into_one_interval():
    """Optuna trials of one method differ in their values, not their seed: each is its own row, n = 1."""
    rate = "params.regularization.dropout.rate"
    runs = pd.DataFrame([_run({rate: "0.05"}, "0", 0.60), _run({rate: "0.1"}, "0", 0.90),
                         _run({rate: "0.1"}, "1", 0.88)])
    t = table2(runs).set_index("method")
    assert list(t.index) == ["dropout (dropout 0.05)", "dropout (dropout 0.1)"]
    assert t.loc["dropout (dropout 0.05)", "n"] == 1 and math.isnan(t.loc["dropout (dropout 0.05)", "test_acc_ci"])
    assert t.loc["dropout (dropout 0.1)", "n"] == 2, "two seeds of one setting are pooled"
    assert t.loc["dropout (dropout 0.1)", "test_acc"] == pytest.approx(0.89)
