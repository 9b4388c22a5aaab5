"""`study quickstart` end to end at a small scale: every step leaves its run in MLflow."""

import json

from mlflow.tracking import MlflowClient

from study.quickstart import quickstart

from .conftest import ROOT


def test_quickstart_runs_end_to_end_and_leaves_every_run_in_mlflow(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs/ lands here
    overrides = [
        "data.num_train=800", "data.num_test=200", "model.width=0.0625", "train.epochs=2", "train.t_max=2",
        "train.batch_size=64", "train.cpus_per_worker=1", "sweep.num_samples=2", "sweep.scheduler=fifo",
        "sweep.space={regularization.dropout.rate: {type: uniform, low: 0.0, high: 0.2}}",
        "regularization.gradient_penalty.lambda=0", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment=qs", f"ray.storage_path={tmp_path}/ray", "dissection.num_images=100",
    ]
    lines = []
    out = quickstart(ROOT / "configs" / "quickstart.yaml", overrides, echo=lines.append, quiet=True)
    text = "\n".join(lines)
    assert "Table 2" in text and "| method | n | train acc | val acc | test acc | Δ test acc vs baseline |" in text
    best = out["sweep"].best
    assert best is out["best"] and best["metrics"]["val/acc"] == max(
        t["metrics"]["val/acc"] for t in out["sweep"].trials if t["error"] is None), "chosen on validation"
    assert "chosen on val/acc" in text
    assert "baseline (none)" in text, "Table 1 is printed"
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("qs").experiment_id])
    parent = out["sweep"].parent_run_id
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent and r.data.tags.get("trial_id")]
    kinds = sorted(r.data.tags.get("kind", "") for r in runs if r.data.tags.get("kind"))
    assert len(trials) >= 2
    assert kinds == ["ablation", "dissection", "intervention", "study", "trial", "trial"]
    assert all(r.data.tags.get("source_run_id") == out["best"]["run_id"] for r in runs
               if r.data.tags.get("kind") in ("ablation", "intervention", "dissection"))
    assert {a.path for a in c.list_artifacts(parent, "report")} >= {"report/table2.md", "report/table2.csv"}
    dissection = next(r for r in runs if r.data.tags.get("kind") == "dissection")
    # one layer at one size: conv3_3 of the 32 px network, 8x8, ablated and dissected, and the two joined
    assert dissection.data.params["dissection.map_size"] == "8x8" and "coarse_map" not in dissection.data.tags
    assert "other_image_size" not in dissection.data.tags
    assert {"units.csv", "figure1_detectors.png", "figure3_top_images.png", "units_joined.csv",
            "groups_joined.csv"} <= {a.path for a in c.list_artifacts(dissection.info.run_id)}
    assert any(line.startswith("join: ") for line in lines), "the console prints the join's headline"
    assert {"iou_null", "p_value", "q_value", "positional"} <= set(out["dissection"].units.columns)
    joined = out["dissection"].join.units
    assert joined["unit"].tolist() == out["ablation"].counts.units.tolist() and out["ablation"].counts.layer == "conv3_3"

    # the MLflow scheme a researcher reads in the UI
    assert c.get_experiment_by_name("qs").artifact_location == str(tmp_path / "mlruns"), "beside the store"
    assert c.get_experiment_by_name("qs").tags["mlflow.experimentKind"] == "custom_model_development"
    source = c.get_run(out["best"]["run_id"])
    assert source.data.tags["kind"] == "trial" and all(r.data.tags["kind"] == "trial" for r in trials)
    assert "dropout.rate" in source.data.params, "the swept value under a short, readable key"
    assert source.data.metrics["epochs_completed"] == 2
    for run in runs:
        kind = run.data.tags.get("kind")
        if kind in ("ablation", "intervention", "dissection"):
            assert run.data.tags["mlflow.parentRunId"] == source.info.run_id, "nested under its source trial"
            assert run.info.run_name == f"{kind} of trial-{source.data.tags['trial_id']}"
            own = [k for k in run.data.params if not k.startswith("trial.")]
            assert own and all(k.startswith(f"{kind}.") for k in own), "its own settings, under its own prefix"
            assert {k: v for k, v in run.data.params.items() if k.startswith("trial.")} == \
                {"trial.dropout.rate": source.data.params["dropout.rate"]}, "then the trial's swept value"
            assert all(k.startswith((f"{kind}/", "selected/")) for k in run.data.metrics), "its own metric prefix"
            assert {k: run.data.metrics.get(k) for k in ("selected/epoch", "selected/test_acc_pct")} == \
                {k: source.data.metrics[k] for k in ("selected/epoch", "selected/test_acc_pct")}, \
                "the headline of the checkpoint it read: its trial's"
            assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["shapes"]
        assert "None" not in run.data.params.values(), f"{kind}: an unset setting is no parameter"
    view = json.loads(c.get_experiment_by_name("qs").tags[f"mlflow.sharedViewState.unitstudy-{parent[:12]}"])
    assert view["searchFilter"] == f"tags.kind = 'trial' and tags.`mlflow.parentRunId` = '{parent}'"
    assert view["columnOrder"][:3] == ["params.`dropout.rate`", "metrics.`selected/val_acc_pct`",
                                       "metrics.`selected/test_acc_pct`"], "the swept value, then the headline"
    assert f"viewStateShareKey=unitstudy-{parent[:12]}" in text, "the printed link opens that view"

