"""`ray job submit --working-dir . -- study ...` (#30): a job's runs outlive Ray's temporary copy of the checkout.

The session's Ray cluster (conftest.py) serves Ray's job API on 127.0.0.1, as a
cluster's does through ``ray dashboard cluster.yaml``. A job uploads this checkout
and runs ``study train`` with the quickstart's relative defaults
(``sqlite:///mlflow.db``, ``ray_results``, ``data``) in Ray's copy of it, which Ray
deletes with the session; the run must land in the job home (``$UNITSTUDY_HOME``,
here a temp dir; ``~/unitstudy`` by default) and stay readable once the copy is gone.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainables.errors import ConfigError

from .conftest import ROOT

# The README's job command, made cheap: one epoch of a 1/16-width VGG on 400 generated images.
CHEAP = ["data.num_train=400", "data.num_test=100", "model.width=0.0625", "train.epochs=1", "train.t_max=1",
         "train.batch_size=64", "train.cpus_per_worker=1", "train.test_images_per_epoch=100"]
STUDY = Path(sys.executable).parent / "study"  # the console script, as `study` on a head's PATH


def submit(client, entrypoint: str, runtime_env: dict, timeout_s: float = 60) -> str:
    """Submit, retrying while the new cluster's job agent has not registered yet ("No available agent")."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1)


def wait(client, job: str, timeout_s: float = 400) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job)
            pytest.fail(f"the job did not finish in {timeout_s} s: {client.get_job_logs(job)[-3000:]}")
        time.sleep(1)
    return status


@pytest.fixture
def in_a_job(tmp_path, monkeypatch):
    """This process in a subfolder of a Ray job's copy of the checkout, with HOME in tmp and no UNITSTUDY_HOME."""
    package = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (package / "configs").mkdir(parents=True)
    monkeypatch.chdir(package / "configs")
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    monkeypatch.delenv("UNITSTUDY_HOME", raising=False)
    return package


def test_in_a_job_relative_locations_resolve_under_home_unitstudy_and_others_stay(in_a_job, tmp_path, monkeypatch):
    from study.config import load_config
    from study.jobs import anchor, job_working_dir

    home = tmp_path / "me" / "unitstudy"
    assert job_working_dir() == in_a_job
    cfg = load_config(None, ["tracking.mlflow_uri=sqlite:///runs/mlflow.db", "ray.storage_path=ray_results",
                             "data.root=data", "dissection.broden_root=broden"])
    assert cfg.tracking.mlflow_uri == f"sqlite:///{home}/runs/mlflow.db"  # sqlite:////tmp/...: an absolute path
    assert (cfg.ray.storage_path, cfg.data.root, cfg.dissection.broden_root) == (
        f"{home}/ray_results", f"{home}/data", f"{home}/broden")
    assert anchor("outputs/report-x") == f"{home}/outputs/report-x"
    kept = [f"tracking.mlflow_uri=sqlite:///{tmp_path}/m.db", "ray.storage_path=s3://bucket/prefix",
            f"data.root={tmp_path}/d", "dissection.broden_root=~/broden"]
    cfg = load_config(None, kept)
    assert [cfg.tracking.mlflow_uri, cfg.ray.storage_path, cfg.data.root, cfg.dissection.broden_root] == [
        k.split("=", 1)[1] for k in kept]
    server = "http://127.0.0.1:5000"
    assert load_config(None, [f"tracking.mlflow_uri={server}"]).tracking.mlflow_uri == server
    monkeypatch.setenv("UNITSTUDY_HOME", str(tmp_path / "elsewhere"))
    assert load_config(None, []).tracking.mlflow_uri == f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    monkeypatch.chdir(tmp_path)  # outside a job: the working directory, as always
    cfg = load_config(None, [])
    assert (cfg.tracking.mlflow_uri, cfg.ray.storage_path, cfg.data.root) == (
        "sqlite:///mlflow.db", "ray_results", "data")
    assert job_working_dir() is None and anchor("outputs") == "outputs"


def test_in_a_job_a_relative_unitstudy_home_is_one_line(in_a_job, run_study, monkeypatch):
    monkeypatch.setenv("UNITSTUDY_HOME", "runs")
    out = run_study("config", "show", cwd=in_a_job)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "error: UNITSTUDY_HOME = runs must be an absolute path (inside a Ray job a relative one would lie in the job's "
        "temporary working directory)"]


def test_a_jobs_driver_joins_its_cluster_so_a_gpu_less_head_is_not_refused(in_a_job, tmp_path, monkeypatch):
    """Ray points a job's driver at its cluster (RAY_ADDRESS) without ``ray.address``: the head it runs on (a CPU
    node in cluster.yaml) need neither a GPU nor the data; only a `study` that starts its own cluster does."""
    import torch

    from study.config import load_config
    from study.runtime import check_local_prerequisites

    cfg = load_config(None, ["train.use_gpu=true", "data.name=cifar100", f"data.root={tmp_path}/nowhere"])
    check_local_prerequisites(cfg)  # in the job: nothing to refuse here
    monkeypatch.chdir(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            check_local_prerequisites(cfg)


def test_gitignore_keeps_the_environment_data_and_runs_out_of_the_uploaded_package():
    """Ray's packaging of ``--working-dir .`` applies the directory's .gitignore (and .rayignore): the rule it
    uses, asked about what a used checkout holds."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    excludes = get_excludes_from_ignore_files(ROOT, include_gitignore=True)

    def uploaded(relative: str) -> bool:
        return not any(exclude(ROOT / relative) for exclude in excludes)

    for left_out in (".venv/bin/python", "data/cifar-100-python.tar.gz", "outputs/report-sweep/table2.md",
                     "mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/x/checkpoint.pt", "ray_results/train-x/a.pkl",
                     "study/__pycache__/cli.cpython-311.pyc"):
        assert not uploaded(left_out), left_out
    for kept in ("study/cli.py", "configs/quickstart.yaml", "trainables/loop.py", "analysis/hooks.py",
                 "pyproject.toml"):
        assert uploaded(kept), kept


@pytest.mark.slow
def test_a_job_with_relative_defaults_leaves_its_run_and_checkpoint_in_the_job_home(ray_dashboard, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from trainables.checkpoint import load_checkpoint

    home = tmp_path / "home"
    client = JobSubmissionClient(ray_dashboard)
    sets = " ".join(f"--set {s}" for s in CHEAP)
    job = submit(client, f"{STUDY} train --config configs/quickstart.yaml {sets}",
                 runtime_env={"working_dir": str(ROOT), "env_vars": {"UNITSTUDY_HOME": str(home)}})
    status = wait(client, job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    # the kit says where the runs go, and names Ray's temporary copy it runs in
    note = re.search(r"^note: running in a Ray job; .* resolve under (\S+) \(\$UNITSTUDY_HOME\), not in the job's "
                     r"temporary directory (\S+)$", logs, re.M)
    assert note and note.group(1) == str(home), logs[-3000:]
    package = Path(note.group(2))
    assert package.parent.name == "working_dir_files" and package.parents[1].name == "runtime_resources"
    assert (package / "configs" / "quickstart.yaml").is_file() and not (package / ".venv").exists()
    assert not {"mlflow.db", "mlruns", "ray_results", "data", "outputs"} & {p.name for p in package.iterdir()}
    checkpoint = Path(re.search(r"^checkpoint: (\S+)$", logs, re.M).group(1))
    assert checkpoint.is_relative_to(home / "ray_results")
    assert f"mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db" in logs, "a UI hint the user can open"

    # Ray deletes its copy with the session: the run and its checkpoint do not need it
    shutil.rmtree(package)
    store = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiment = store.get_experiment_by_name("quickstart")
    (run,) = store.search_runs([experiment.experiment_id], "tags.kind = 'trial'")
    assert run.info.status == "FINISHED" and run.data.metrics["epochs_completed"] == 1
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(home / "mlruns"), "the artifacts beside the store"
    logged = load_checkpoint(artifacts / "checkpoint" / "checkpoint.pt")
    kept = load_checkpoint(checkpoint / "checkpoint.pt")
    assert logged["epoch"] == kept["epoch"] == 0
    assert logged["config"]["data"]["root"] == str(home / "data"), "the workers read the job home's data folder"
    assert all(logged["model"][k].equal(kept["model"][k]) for k in kept["model"])


def test_a_job_client_without_the_token_is_refused_with_rays_hint_which_the_readme_answers(ray_dashboard, tmp_path):
    """A laptop without the cluster's token (no RAY_AUTH_MODE, an empty home) is refused by Ray's own client;
    the kit's cluster docs give the one line that fixes it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    probe = ("import sys; from ray.job_submission import JobSubmissionClient; "
             "JobSubmissionClient(sys.argv[1]).list_jobs()")
    out = subprocess.run([sys.executable, "-c", probe, ray_dashboard], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "RAY_AUTH_MODE" in out.stderr, out.stderr[-2000:]
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert any(re.search(r"^export RAY_AUTH_MODE=token\b", p.read_text(), re.M) for p in docs if p.is_file())
