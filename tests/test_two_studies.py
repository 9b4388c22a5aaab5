"""Two `study` commands started at once on one machine, each with its own local Ray cluster, both finish.

Before the fix the second cluster made Ray resolve ``address="auto"`` to two
clusters, and Ray Train's placement-group cleaner (which asks the state API that
way) retried forever, so a study could hang at its end. Each local cluster now
gets its GCS port and ``RAY_ADDRESS`` before it starts (``study.runtime.isolate_local_cluster``).
A multi-trial sweep and a training run side by side, as two users would start them.
"""

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT

pytestmark = pytest.mark.slow

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SMALL = ["data.num_train=400", "data.num_test=100", "model.width=0.0625", "train.epochs=2", "train.t_max=2",
         "train.batch_size=64", "train.cpus_per_worker=1", "ray.num_cpus=3",
         "regularization.gradient_penalty.lambda=0"]


def start(tmp_path, name, *args):
    folder = tmp_path / name
    folder.mkdir()
    command = [sys.executable, "-m", "study.cli", *args, "--config", str(QUICKSTART)]
    for item in [*SMALL, f"tracking.mlflow_uri=sqlite:///{folder}/mlflow.db", f"ray.storage_path={folder}/ray"]:
        command += ["--set", item]
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    return folder, subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)


def test_a_sweep_and_a_training_started_at_once_both_finish(tmp_path):
    sweep_dir, sweep = start(tmp_path, "sweep", "sweep", "--set", "sweep.num_samples=2", "--set",
                             "sweep.scheduler=fifo", "--set",
                             "sweep.space={regularization.dropout.rate: {type: uniform, low: 0.0, high: 0.2}}")
    train_dir, train = start(tmp_path, "train", "train")
    outputs = {}
    for name, proc in (("sweep", sweep), ("train", train)):
        try:
            outputs[name] = proc.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            sweep.kill(), train.kill()
            pytest.fail(f"the {name} did not finish: two local clusters confused each other")
        assert proc.returncode == 0, (name, outputs[name][1][-2000:])
    assert "2/2 trials finished" in outputs["sweep"][0]
    assert "done: train/acc" in outputs["train"][0]
    for folder, runs in ((sweep_dir, 3), (train_dir, 2)):  # a parent and its trials
        c = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        found = c.search_runs([e.experiment_id for e in c.search_experiments()])
        assert len(found) == runs and all(r.info.status == "FINISHED" for r in found)


PROBE = """
import sys
import ray
from study.config import load_config
from study.runtime import init_ray

init_ray(load_config(sys.argv[1], ["ray.num_cpus=1"]))

@ray.remote
def ask_state_api():
    # what Ray Train's placement-group cleaner does inside the cluster: the state API with no address
    from ray.util.state import list_nodes
    return len(list_nodes())

print("nodes seen from inside the cluster:", ray.get(ask_state_api.remote()))
"""


def test_inside_a_local_cluster_the_state_api_finds_its_own_cluster_while_another_runs(tmp_path):
    """The cause itself: with a second local cluster up, the state API without an address (Ray Train's
    cleaner) must resolve the cluster it runs in instead of failing on "multiple active Ray instances"."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(num_cpus=1); print('up', flush=True); "
                              "time.sleep(600)"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        probe = subprocess.run([sys.executable, "-c", PROBE, str(QUICKSTART)], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
        assert probe.returncode == 0, probe.stderr[-2000:]
        assert "nodes seen from inside the cluster: 1" in probe.stdout
    finally:
        other.terminate()
        other.wait(timeout=60)


OPEN_STORE = """
import sys
from study.config import load_config
from study.mlflow_store import experiment_id
cfg = load_config(None, [f"tracking.mlflow_uri=sqlite:///{sys.argv[1]}", "tracking.experiment=shared"])
print(experiment_id(cfg))
"""


def test_commands_opening_one_new_mlflow_store_at_once_all_succeed(tmp_path):
    """MLflow creates a new sqlite store's schema on first opening; two processes doing it at once used to
    fail with "no such column" or "table ... already exists". Now one creates it, and one experiment, for all."""
    db = tmp_path / "mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, str(db)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 2, [err[-1500:] for _, err in outs]
    ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(ids) == 1, "one experiment, created by whichever process got there first"
    assert sorted(e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()) == ["Default", "shared"]
