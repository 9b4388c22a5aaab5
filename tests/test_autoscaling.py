"""A cluster that starts with no worker, as `ray up cluster.yaml` does: study sweep and study ablate grow it.

Ray's ``fake_multinode`` provider runs an autoscaler whose "nodes" are raylets on
this machine: a head with 0 CPUs and one worker type of 4 CPUs with
``min_workers: 0``. Before the fix the kit read ``ray.cluster_resources()`` (no
CPU at all) and refused every run. The cluster is started with ``ray start
--head`` in its own temp dir and stopped by process id (every process of it
carries that dir on its command line), never with ``ray stop``, which would end
every Ray process on the machine.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
ADDRESS = "127.0.0.1:6379"  # the fake provider joins its nodes at the default GCS port

AUTOSCALING = {
    "cluster_name": "unitstudy-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {"ssh_user": "ubuntu"},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_worker": {"resources": {"CPU": 4}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
    "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
}


def _processes_of(temp_dir: str) -> list[int]:
    """Process ids whose command line mentions ``temp_dir`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-closed server's TIME_WAIT is no owner
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def fake_cluster():
    if not _port_free(6379):
        pytest.skip("port 6379 is taken; the fake autoscaling provider needs it")
    temp_dir = tempfile.mkdtemp(prefix="us-as-", dir="/tmp")  # short: Unix socket paths are limited
    config = Path(temp_dir) / "autoscaling.json"
    config.write_text(json.dumps(AUTOSCALING))
    # RAY_ADDRESS reaches every process of this cluster (they inherit the raylets' environment): Ray Train's
    # placement-group cleaner resolves "auto" through it instead of finding two clusters on this machine.
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_ADDRESS=ADDRESS)
    ray = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run([ray, "start", "--head", "--num-cpus=0", "--port=6379", f"--autoscaling-config={config}",
                        f"--temp-dir={temp_dir}/ray"], env=env, check=True, capture_output=True, timeout=180)
        # ``ray start`` wrote the address to <temp dir>/ray/ray_current_cluster, where address="auto" looks
        # when RAY_TMPDIR names the temp dir (on a `ray up` head: /tmp/ray, the default)
        env["UNITSTUDY_TEST_RAY_TMPDIR"] = temp_dir
        yield env
    finally:
        for _ in range(3):
            for pid in _processes_of(temp_dir):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        assert not _processes_of(temp_dir), "every process of the test cluster is gone"
        shutil.rmtree(temp_dir, ignore_errors=True)


def study_command(tmp: Path, *args: str) -> list[str]:
    sets = [f"tracking.mlflow_uri=sqlite:///{tmp}/mlflow.db", "tracking.experiment=autoscaling",
            f"ray.storage_path={tmp}/ray", f"ray.address={ADDRESS}", "ray.scale_up_timeout_s=120",
            "data.num_train=400", "data.num_test=100", "model.width=0.0625", "train.epochs=1", "train.t_max=1",
            "train.batch_size=64", "train.cpus_per_worker=1"]
    command = [sys.executable, "-m", "study.cli", args[0], "--config", str(QUICKSTART)]
    for item in sets:
        command += ["--set", item]
    return command + list(args[1:])  # last: a test's own --set wins over the defaults above


def study(env: dict, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(study_command(tmp, *args), cwd=tmp, env=env, capture_output=True, text=True, timeout=480)


def auto_env(fake_cluster: dict) -> dict:
    """As on a `ray up` head: no RAY_ADDRESS; ``ray.address=auto`` reads the address ``ray start`` wrote to
    <temp dir>/ray/ray_current_cluster (RAY_TMPDIR names the temp dir; on a head it is /tmp, the default),
    while the test session's own cluster also runs on this machine."""
    env = {k: v for k, v in fake_cluster.items() if k not in ("RAY_ADDRESS", "UNITSTUDY_TEST_RAY_TMPDIR")}
    env["RAY_TMPDIR"] = fake_cluster["UNITSTUDY_TEST_RAY_TMPDIR"]
    return env


AUTO = ("--set", "ray.address=auto")
SWEPT: dict = {}  # the first test's store and best trial, for the second


def test_a_sweep_and_an_ablation_scale_a_cluster_up_from_zero_workers_and_finish(fake_cluster, tmp_path):
    # A trial whose worker no node type holds is refused at once, from the autoscaling config, not after 120 s.
    started = time.monotonic()
    refused = study(fake_cluster, tmp_path, "train", "--set", "train.cpus_per_worker=6")
    assert refused.returncode != 0
    assert "a Train worker needs 6 CPU on one node, but no node type of this autoscaling cluster has that " \
        "(head: 0 CPU; cpu_worker: 4 CPU)" in refused.stderr, refused.stderr[-2000:]
    assert "waiting" not in refused.stdout and time.monotonic() - started < 90

    env = auto_env(fake_cluster)
    swept = study(env, tmp_path, "sweep", "--set", "sweep.num_samples=2", "--set", "sweep.scheduler=fifo",
                  "--set", "sweep.space={regularization.dropout.rate: {type: uniform, low: 0.0, high: 0.2}}",
                  "--set", "regularization.gradient_penalty.lambda=0", *AUTO)
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert "waiting up to 120 s for the autoscaler to start nodes for one trial (2 CPU" in swept.stdout
    # 2 trials of 1 + 1 CPU per 4-CPU node, 2 nodes at most: sized from the config, not from the one node up
    assert "up to 4 trials at once: what this autoscaling cluster holds at its max_workers (2)" in swept.stdout
    assert "2/2 trials finished" in swept.stdout, swept.stdout
    best = next(line for line in swept.stdout.splitlines() if "<- best" in line)
    parent = swept.stdout.split("MLflow parent run ")[1].split()[0]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.get_run(parent).data.tags["best_run_id"]
    # ablation.num_gpus = 0.25 (the default for GPU clusters) on a cluster with no GPU node type: CPU tasks, no wait
    started = time.monotonic()
    ablated = study(env, tmp_path, "ablate", "--checkpoint", run_id, "--set", "ablation.num_gpus=0.25", *AUTO)
    assert ablated.returncode == 0, ablated.stderr[-3000:]
    assert "units ablated one at a time on 100 test images" in ablated.stdout, ablated.stdout
    assert "waiting" not in ablated.stdout and time.monotonic() - started < 110
    assert best
    SWEPT.update(tmp=tmp_path, run_id=run_id)


def test_two_studies_submitted_at_once_to_a_ray_start_cluster_both_finish(fake_cluster):
    """A training and an ablation of the first test's best trial, started together with ``ray.address=auto``."""
    if not SWEPT:
        pytest.skip("needs the first test's sweep")
    tmp, env = SWEPT["tmp"], auto_env(fake_cluster)
    procs = {
        "train": subprocess.Popen(study_command(tmp, "train", "--set", "tracking.experiment=at-once", *AUTO),
                                  cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "ablate": subprocess.Popen(study_command(tmp, "ablate", "--checkpoint", SWEPT["run_id"], "--out",
                                                 str(tmp / "ablation-at-once"), *AUTO),
                                   cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    out = {name: p.communicate(timeout=480) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}: {out[name][1][-3000:]}"
    assert "done: train/acc" in out["train"][0], out["train"][0]
    assert "units ablated one at a time on 100 test images" in out["ablate"][0], out["ablate"][0]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    ablations = client.search_runs([client.get_experiment_by_name("autoscaling").experiment_id],
                                   filter_string="tags.kind = 'ablation'")
    assert [r.data.tags["source_run_id"] for r in ablations] == [SWEPT["run_id"]] * 2, "both ablations logged"
