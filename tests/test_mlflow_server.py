"""A real MLflow tracking server, as `cluster.yaml` runs one on the head: every run and artifact goes through it.

The server is the session's `mlflow server` (conftest.py: a sqlite backend and
`--artifacts-destination s3://<bucket>/mlflow` on the session's S3-compatible
server, as `cluster.yaml` has it). `study train` (local Ray storage), `study
ablate` (by run id: the checkpoint is downloaded through the server) and `study
report` run against `tracking.mlflow_uri=http://127.0.0.1:PORT`; their
checkpoints, tables and figures must land in the bucket. An unreachable URI
fails at once, with one line, before Ray starts.
"""

import pytest
from mlflow.tracking import MlflowClient

from study.ablate import run_ablation
from study.config import load_config
from study.report import report
from study.train import train

from .conftest import ROOT, free_port

pytestmark = pytest.mark.slow

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_train_ablate_and_report_go_through_a_real_tracking_server(ray_cluster, mlflow_server, s3_store, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri, prefix = mlflow_server
    sets = [f"tracking.mlflow_uri={uri}", "tracking.experiment=server", f"ray.storage_path={tmp_path}/ray",
            "data.num_train=400", "data.num_test=100", "model.width=0.0625", "train.epochs=1", "train.t_max=1",
            "train.batch_size=64", "ablation.num_gpus=0", "ablation.precision_sample=0"]
    cfg = load_config(QUICKSTART, sets)
    result = train(cfg, quiet=True)
    run_id = result.trials[0]["run_id"]
    trial_keys = s3_store.keys(prefix)
    assert [k for k in trial_keys if k.endswith(f"{run_id}/artifacts/checkpoint/checkpoint.pt")], \
        "the checkpoint went to the server's artifact store"

    ablated = run_ablation(run_id, QUICKSTART, sets, out=tmp_path / "out", quiet=True)
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(ablated.run_id)}
    assert {"units_ranked.csv", "unit_change.png", "heatmap.png"} <= logged
    stored = s3_store.keys(f"{prefix}")
    assert [k for k in stored if k.endswith(f"{ablated.run_id}/artifacts/units_ranked.csv")]
    assert [k for k in stored if k.endswith(f"{ablated.run_id}/artifacts/heatmap.png")]
    assert client.get_run(ablated.run_id).data.tags["source_run_id"] == run_id, "found by run id on the server"

    r = report(cfg, out_dir=tmp_path / "report")
    assert {"report/table2.md", "report/table2.csv"} <= {a.path for a in client.list_artifacts(r.logged_to, "report")}
    assert [k for k in s3_store.keys(prefix) if k.endswith(f"{r.logged_to}/artifacts/report/table2.md")]
    assert not (tmp_path / "mlruns").exists(), "nothing was written beside the commands instead"


def test_an_unreachable_tracking_server_is_one_line_before_ray_starts(run_study, tmp_path):
    port = free_port()  # nothing listens there
    for command in (["train"], ["sweep"], ["ablate", "--checkpoint", "0" * 32], ["report"]):
        out = run_study(*command, "--config", str(QUICKSTART), "--set", f"tracking.mlflow_uri=http://127.0.0.1:{port}",
                        "--set", f"ray.storage_path={tmp_path}/ray", cwd=tmp_path)
        assert out.returncode == 2, (command, out.stderr[-1500:])
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert f"cannot reach the MLflow tracking server at tracking.mlflow_uri = http://127.0.0.1:{port}" in out.stderr
        assert not (tmp_path / "ray").exists(), "refused before any Ray work"
