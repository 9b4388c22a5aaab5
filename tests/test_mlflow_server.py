"""A real MLflow tracking server, as `cluster.yaml` runs one on the head: every run and artifact goes through it.

The server is `mlflow server` in a subprocess on 127.0.0.1 (a sqlite backend and
an `--artifacts-destination` in a temporary directory), stopped by its process
group at the end. `study train`, `study ablate` (by run id: the checkpoint is
downloaded through the server) and `study report` run against
`tracking.mlflow_uri=http://127.0.0.1:PORT`; their checkpoints, tables and figures
must land in the server's artifact store. An unreachable URI fails at once, with
one line, before Ray starts.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from study.ablate import run_ablation
from study.config import load_config
from study.report import report
from study.train import train

from .conftest import ROOT

pytestmark = pytest.mark.slow

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"mlflow server did not come up: {(root / 'server.log').read_text()[-2000:]}")
        yield uri, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_train_ablate_and_report_go_through_a_real_tracking_server(ray_cluster, server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri, root = server
    sets = [f"tracking.mlflow_uri={uri}", "tracking.experiment=server", f"ray.storage_path={tmp_path}/ray",
            "data.num_train=400", "data.num_test=100", "model.width=0.0625", "train.epochs=1", "train.t_max=1",
            "train.batch_size=64", "ablation.num_gpus=0", "ablation.precision_sample=0"]
    cfg = load_config(QUICKSTART, sets)
    result = train(cfg, quiet=True)
    run_id = result.trials[0]["run_id"]
    stored = root / "artifacts"
    assert len(list(stored.rglob("checkpoint.pt"))) == 1, "the checkpoint went to the server's artifact store"

    ablated = run_ablation(run_id, QUICKSTART, sets, out=tmp_path / "out", quiet=True)
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(ablated.run_id)}
    assert {"units_ranked.csv", "unit_change.png", "heatmap.png"} <= logged
    assert list(stored.rglob("units_ranked.csv")) and list(stored.rglob("heatmap.png"))
    assert client.get_run(ablated.run_id).data.tags["source_run_id"] == run_id, "found by run id on the server"

    r = report(cfg, out_dir=tmp_path / "report")
    assert {"report/table2.md", "report/table2.csv"} <= {a.path for a in client.list_artifacts(r.logged_to, "report")}
    assert list(stored.rglob("table2.md"))
    assert not (tmp_path / "mlruns").exists(), "nothing was written beside the commands instead"


def test_an_unreachable_tracking_server_is_one_line_before_ray_starts(run_study, tmp_path):
    port = _free_port()  # nothing listens there
    for command in (["train"], ["sweep"], ["ablate", "--checkpoint", "0" * 32], ["report"]):
        out = run_study(*command, "--config", str(QUICKSTART), "--set", f"tracking.mlflow_uri=http://127.0.0.1:{port}",
                        "--set", f"ray.storage_path={tmp_path}/ray", cwd=tmp_path)
        assert out.returncode == 2, (command, out.stderr[-1500:])
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert f"cannot reach the MLflow tracking server at tracking.mlflow_uri = http://127.0.0.1:{port}" in out.stderr
        assert not (tmp_path / "ray").exists(), "refused before any Ray work"
