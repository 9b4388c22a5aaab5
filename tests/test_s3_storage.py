"""The cluster's storage path, exercised on an S3-compatible server on 127.0.0.1 (moto's, checking credentials).

As on a cluster built from `cluster.yaml`: Ray's storage is `s3://bucket/ray`, the
MLflow server keeps its artifacts in `s3://bucket/mlflow`, and the drivers that
train are separate processes joined to a Ray cluster whose workers were started
without any of the store's variables, so the endpoint and the credentials reach
them only as a worker on another node gets them from `study`: through the job's
`runtime_env`. A sweep of 2 trials is killed after its first trial and resumed
from the bucket; its best trial is then ablated and dissected by run id from a
directory that has never seen its files; the report is read back through the server.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from study.ablate import run_ablation
from study.config import load_config
from study.dissect import run_dissection
from study.report import report
from study.runtime import storage_path
from trainables.errors import ConfigError

from .conftest import ROOT

pytestmark = pytest.mark.slow

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
NAME = "sweep-s3"
EPOCHS = 2
SMALL = ["data.num_train=600", "data.num_test=200", "model.width=0.0625", f"train.epochs={EPOCHS}",
         f"train.t_max={EPOCHS}", "train.cpus_per_worker=1", "train.batch_size=64", "tracking.experiment=s3",
         "regularization.focused_dropout.par_rate=0", "ablation.num_gpus=0", "ablation.precision_sample=0",
         "dissection.num_images=40"]
SWEEP = ["sweep.space={}", "sweep.grid={train.seed: [0, 1]}", "sweep.scheduler=fifo", "sweep.num_samples=1",
         "sweep.max_concurrent_trials=1"]


def terminated_in_bucket(store, prefix: str) -> int:
    """Trials that the newest experiment state Tune uploaded to the bucket records as TERMINATED."""
    states = sorted(k for k in store.keys(prefix) if k.rsplit("/", 1)[-1].startswith("experiment_state-"))
    if not states:
        return 0
    try:
        trials = json.loads(store.read(states[-1]))["trial_data"]
    except (ValueError, KeyError):
        return 0
    return sum(json.loads(state)["status"] == "TERMINATED" for state, _ in trials)


@pytest.fixture(scope="module")
def cluster_setup(ray_cluster, s3_store, mlflow_server, tmp_path_factory):
    """The killed-then-resumed sweep (tracked on the session's MLflow server, whose artifacts are in the bucket)."""
    root = tmp_path_factory.mktemp("s3-cluster")
    uri, _ = mlflow_server
    sets = [*SMALL, f"tracking.mlflow_uri={uri}", f"ray.storage_path=s3://{s3_store.bucket}/ray"]
    address = ray_cluster.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "study.cli", "sweep", "--config", str(QUICKSTART), "--name", NAME]
    for item in [*sets, *SWEEP, f"ray.address={address}"]:
        args += ["--set", item]
    env = {**os.environ, **s3_store.env, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}
    for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT"):
        env.pop(name, None)
    driver_dir = root / "driver"
    driver_dir.mkdir()
    log = root / "sweep.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=driver_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = MlflowClient(uri)

    def finished() -> int:
        exp = client.get_experiment_by_name("s3")
        return len(client.search_runs([exp.experiment_id], filter_string="tags.status = 'finished'")) if exp else 0

    deadline = time.time() + 300
    while time.time() < deadline and (terminated_in_bucket(s3_store, f"ray/{NAME}/") < 1 or finished() < 1):
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before it could be killed: {log.read_text()[-3000:]}")
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert terminated_in_bucket(s3_store, f"ray/{NAME}/") == 1, "killed after one of the two trials"
    before = {r.data.tags["trial_id"]: r.info.end_time
              for r in client.search_runs([client.get_experiment_by_name("s3").experiment_id],
                                          filter_string="tags.status = 'finished'")}
    checkpoints_before = sorted(k for k in s3_store.keys("ray/train-") if k.endswith("/checkpoint.pt"))

    # no --name: the newest sweep in the bucket (its tuner.pkl), as after `study sweep` on one's laptop
    resume = [a for a in args if a not in ("--name", NAME)]
    resumed = subprocess.run([*resume, "--resume"], cwd=driver_dir, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    return {"uri": uri, "sets": sets, "client": client, "finished_before": before, "resumed": resumed,
            "checkpoints_before": checkpoints_before, "driver_dir": driver_dir, "root": root}


def trial_runs(setup) -> list:
    c = setup["client"]
    return c.search_runs([c.get_experiment_by_name("s3").experiment_id], filter_string="tags.kind = 'trial'")


def test_a_killed_s3_sweep_resumes_from_the_bucket_and_reruns_nothing(cluster_setup, s3_store):
    setup = cluster_setup
    assert f"resuming sweep {NAME}" in setup["resumed"].stdout
    assert "2/2 trials finished" in setup["resumed"].stdout
    runs = trial_runs(setup)
    assert len(runs) == 2, "one MLflow run per trial, none duplicated"
    (finished_id, end_time), = setup["finished_before"].items()
    keys = s3_store.keys("ray/")
    for run in runs:
        history = setup["client"].get_metric_history(run.info.run_id, "test/acc")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), "every epoch once"
        trial_id = run.data.tags["trial_id"]
        uri = run.data.tags["checkpoint_uri"]
        assert uri.startswith(f"s3://{s3_store.bucket}/ray/train-{trial_id}/checkpoint_"), uri
        assert uri.removeprefix(f"s3://{s3_store.bucket}/") + "/checkpoint.pt" in keys, "the tag names the object"
        saved = [k for k in keys if k.startswith(f"ray/train-{trial_id}/checkpoint_") and k.endswith("/checkpoint.pt")]
        assert len(saved) == EPOCHS, f"one checkpoint per epoch in the bucket for {trial_id}: {saved}"
        assert "checkpoint stays in the storage" in run.data.tags["mlflow.note.content"]
        assert not setup["client"].list_artifacts(run.info.run_id, "checkpoint"), "no copy: the bucket holds it"
    finished = next(r for r in runs if r.data.tags["trial_id"] == finished_id)
    assert finished.info.end_time == end_time, "the trial finished before the kill was not run again"
    assert set(setup["checkpoints_before"]) <= set(keys)
    assert not list(setup["driver_dir"].rglob("checkpoint.pt")), "no checkpoint was written beside the driver"


def test_ablate_and_dissect_by_run_id_from_a_fresh_directory_fetch_the_checkpoint_from_the_bucket(
        cluster_setup, s3_env, tmp_path, monkeypatch):
    setup = cluster_setup
    run = max(trial_runs(setup), key=lambda r: r.data.metrics["val/acc"])
    key = run.data.tags["checkpoint_uri"].removeprefix(f"s3://{s3_env.bucket}/") + "/checkpoint.pt"
    stored = s3_env.read(key)
    local = tmp_path / "local" / "checkpoint.pt"
    local.parent.mkdir()
    local.write_bytes(stored)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)

    by_run = run_ablation(run.info.run_id, QUICKSTART, setup["sets"], out=tmp_path / "a-run", quiet=True)
    assert by_run.source.fingerprint == hashlib.sha256(stored).hexdigest(), "the bucket's object, whole"
    assert by_run.source.run_id == run.info.run_id
    by_path = run_ablation(str(local), QUICKSTART, setup["sets"], out=tmp_path / "a-path", quiet=True)
    for field in ("units", "correct", "lost", "baseline_correct", "total"):
        assert torch.equal(getattr(by_run.counts, field), getattr(by_path.counts, field)), field
    assert by_run.ranked.equals(by_path.ranked), "the same ablation as from the local file"

    d_run = run_dissection(run.info.run_id, QUICKSTART, setup["sets"], out=tmp_path / "d-run", quiet=True)
    d_path = run_dissection(str(local), QUICKSTART, setup["sets"], out=tmp_path / "d-path", quiet=True)
    assert d_run.units.equals(d_path.units), "the same dissection as from the local file"
    assert not list(fresh.rglob("checkpoint.pt")), "the fetched checkpoint was not left in the working directory"

    # the analyses' tables and figures went through the server into the bucket, and the report reads them back
    client = setup["client"]
    logged = {a.path for a in client.list_artifacts(by_run.run_id)}
    assert {"units_ranked.csv", "unit_change.png"} <= logged
    mlflow_keys = s3_env.keys("mlflow/")
    assert any(k.endswith(f"{by_run.run_id}/artifacts/units_ranked.csv") for k in mlflow_keys)
    assert any(k.endswith(f"{d_run.run_id}/artifacts/figure1_detectors.png") for k in mlflow_keys)
    cfg = load_config(QUICKSTART, setup["sets"])
    r = report(cfg, out_dir=tmp_path / "report")
    assert {"report/table2.md", "report/table2.csv"} <= {a.path for a in client.list_artifacts(r.logged_to, "report")}
    assert any(k.endswith(f"{r.logged_to}/artifacts/report/table2.md") for k in s3_env.keys("mlflow/"))
    assert "| baseline | 2 |" in r.markdown, "Table 2 pools the sweep's two seeds, read back from the server"


def test_a_missing_bucket_or_refused_credentials_is_one_line_before_ray_starts(s3_store, run_study, tmp_path):
    """The command line: one line on stderr, exit 2, nothing started or written (here a refused secret)."""
    uri = f"s3://{s3_store.bucket}/refused"
    env = {**os.environ, **s3_store.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    out = subprocess.run([sys.executable, "-m", "study.cli", "sweep", "--config", str(QUICKSTART),
                          "--set", f"ray.storage_path={uri}",
                          "--set", f"tracking.mlflow_uri=sqlite:///{tmp_path}/m.db"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(
        f"error: ray.storage_path = {uri} cannot be written (SIGNATURE_DOES_NOT_MATCH: The request signature we "
        "calculated does not match the signature you provided"), out.stderr
    assert "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in out.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "m.db").exists(), "refused before the rest"


@pytest.mark.parametrize("uri, key_id, reason", [
    ("s3://no-such-bucket-here/ray", None,
     "(NO_SUCH_BUCKET: The specified bucket does not exist); create the bucket or name one that exists"),
    ("s3://BUCKET/ray", "AKIANOSUCHKEY0000000",
     "(INVALID_ACCESS_KEY_ID: The AWS Access Key Id you provided does not exist in our records); "
     "check the credentials"),
])
def test_a_missing_bucket_or_an_unknown_key_names_the_storage_path(s3_env, monkeypatch, uri, key_id, reason):
    uri = uri.replace("BUCKET", s3_env.bucket)
    if key_id:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    cfg = load_config(QUICKSTART, [f"ray.storage_path={uri}"])
    with pytest.raises(ConfigError) as info:
        storage_path(cfg)
    assert str(info.value).startswith(f"ray.storage_path = {uri} cannot be written {reason}")
    monkeypatch.undo()
    assert not [k for k in s3_env.keys() if ".write-probe-" in k], "no probe object was left behind"
