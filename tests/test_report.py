"""`study report`: Table 2 from a seeded MLflow store, checked against hand-computed means and t intervals."""

import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis.tables import mean_ci, method_of, table2
from study.config import load_config
from study.report import report
from trainables.errors import ConfigError

from .conftest import ROOT

# (method tag or None, dropout, par_rate, lambda, train acc, test acc, status)
RUNS = [
    (None, 0.0, 0.0, 0.0, 0.99, 0.70, "finished"),
    (None, 0.0, 0.0, 0.0, 0.97, 0.72, "finished"),
    (None, 0.0, 0.0, 0.0, 0.98, 0.74, "finished"),
    (None, 0.2, 0.0, 0.0, 0.90, 0.60, "finished"),
    (None, 0.2, 0.0, 0.0, 0.92, 0.64, "finished"),
    (None, 0.0, 0.1, 0.0, 0.80, 0.75, "finished"),
    (None, 0.0, 0.1, 0.1, 0.50, 0.10, "stopped_early"),
    ("focused_dropout", 0.0, 0.1, 0.0, 0.10, 0.05, "failed"),
]


@pytest.fixture
def seeded_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("seeded")
    parent = c.create_run(exp, run_name="sweep", tags={"study.kind": "sweep"}).info.run_id
    for i, (tag, rate, par, lam, train_acc, test_acc, status) in enumerate(RUNS):
        tags = {"mlflow.parentRunId": parent, "trial_id": f"t{i}", "status": status}
        if tag:
            tags["method"] = tag
        run = c.create_run(exp, tags=tags).info.run_id
        c.log_param(run, "regularization.dropout.rate", rate)
        c.log_param(run, "regularization.focused_dropout.par_rate", par)
        c.log_param(run, "regularization.gradient_penalty.lambda", lam)
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
    assert "| baseline | 3 | 98.00% ± 2.48 | 72.00% ± 4.97 |" in r.markdown
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
