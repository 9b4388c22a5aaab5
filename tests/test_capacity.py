"""What an autoscaling cluster can grow to, read from its config: checked against hand-counted clusters."""

import pytest

from study.config import StudyConfig, load_config
from study.runtime import HEAD, capacity_from_config, check_capacity, copies_in, trial_bundles
from trainables.errors import ConfigError

from .conftest import ROOT

GPU_CLUSTER = {  # the shape of cluster.yaml once `ray up` has filled in the instance's resources
    "max_workers": 3,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "gpu_worker": {"resources": {"CPU": 8, "GPU": 1}, "min_workers": 0, "max_workers": 8},
    },
}


def cfg(**train) -> StudyConfig:
    c = load_config(ROOT / "configs" / "quickstart.yaml")
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def test_the_grown_cluster_is_capped_by_the_global_max_workers():
    cap = capacity_from_config(GPU_CLUSTER)
    assert cap.total() == {"CPU": 24.0, "GPU": 3.0}  # 3 workers (not 8) x 8 CPU, 1 GPU; the head adds 0 CPU
    assert [t.name for t in cap.node_types] == [HEAD, "gpu_worker"]


def test_trials_are_packed_node_by_node():
    cap = capacity_from_config(GPU_CLUSTER)
    # one GPU worker of 2 CPUs + the trial's driver CPU = 3 CPU, 1 GPU: one per node (a node has one GPU), 3 nodes
    assert cap.copies(trial_bundles(cfg(use_gpu=True, num_workers=1, cpus_per_worker=2))) == 3
    # CPU-only trials of 1 + 2 x 1 CPU: two per 8-CPU node (6 CPU), not 24 // 3 = 8 spread over scraps
    assert cap.copies(trial_bundles(cfg(use_gpu=False, num_workers=2, cpus_per_worker=1))) == 3 * 2
    # a trial whose 2 GPU workers need two nodes: counted over the grown cluster (3 GPUs hold one such trial)
    assert cap.copies(trial_bundles(cfg(use_gpu=True, num_workers=2, cpus_per_worker=2))) == 1
    assert cap.copies(trial_bundles(cfg(use_gpu=True, num_workers=4, cpus_per_worker=2))) == 0


def test_a_trial_no_node_type_could_hold_is_refused_with_the_node_types_named():
    cap = capacity_from_config(GPU_CLUSTER)
    with pytest.raises(ConfigError, match=r"needs 16 CPU on one node.*gpu_worker: 8 CPU, 1 GPU"):
        check_capacity(cfg(use_gpu=False, num_workers=1, cpus_per_worker=16), cap)
    with pytest.raises(ConfigError, match=r"grows to at most 24 CPU, 3 GPU \(max_workers 3"):
        check_capacity(cfg(use_gpu=True, num_workers=4, cpus_per_worker=2), cap)
    check_capacity(cfg(use_gpu=True, num_workers=3, cpus_per_worker=2), cap)  # three nodes hold it: no error


def test_a_node_type_without_declared_resources_leaves_the_capacity_unknown():
    config = {**GPU_CLUSTER, "available_node_types": {**GPU_CLUSTER["available_node_types"],
                                                       "gpu_worker": {"resources": {}, "max_workers": 8}}}
    assert capacity_from_config(config) is None


# ----------------------------------------------------------------------------- GPU shares (train.gpus_per_worker)

ONE_GPU = {"CPU": 8.0, "GPU": 1.0}  # a cluster that is up (no autoscaler): one node, 8 CPUs, one GPU


def shared(share: float, **train) -> StudyConfig:
    return cfg(**{"use_gpu": True, "num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": share, **train})


def printed_concurrency(monkeypatch, capsys, c: StudyConfig, cluster: dict) -> tuple[int, str]:
    """``study sweep``'s trials at once on a cluster of ``cluster`` resources, and the line it printed."""
    import ray

    from study import sweep

    monkeypatch.setattr(sweep, "cluster_capacity", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cluster))
    n = sweep.concurrent_trials(c)
    return n, capsys.readouterr().out.strip()


def test_a_quarter_gpu_share_runs_four_trials_at_once_on_one_gpu(monkeypatch, capsys):
    # by hand: a trial is 1 driver CPU + 1 worker (1 CPU, 0.25 GPU); 8 CPUs hold 4 trials, one GPU holds 4 workers
    n, line = printed_concurrency(monkeypatch, capsys, shared(0.25), ONE_GPU)
    assert n == 4
    assert line == ("up to 4 trials at once: what this cluster holds (8 CPU, 1 GPU; "
                    "a trial takes 1 x (1 CPU, 0.25 GPU) + 1 CPU)")
    assert printed_concurrency(monkeypatch, capsys, shared(1.0), ONE_GPU)[0] == 1  # whole GPUs: one trial
    # 0.3 packs unevenly: three workers per GPU (0.9 of it), not 1 / 0.3 = 3.33
    assert printed_concurrency(monkeypatch, capsys, shared(0.3), ONE_GPU)[0] == 3
    # 0.1: ten per GPU, though 1 // 0.1 == 9.0 in floating point (24 CPUs hold 12 trials)
    assert printed_concurrency(monkeypatch, capsys, shared(0.1), {"CPU": 24.0, "GPU": 1.0})[0] == 10
    # two workers per trial at 0.25: 8 worker slots on 2 GPUs -> 4 trials, if the 16 CPUs (3 per trial) allow 5
    assert printed_concurrency(monkeypatch, capsys, shared(0.25, num_workers=2), {"CPU": 16.0, "GPU": 2.0})[0] == 4


def test_train_workers_request_the_configured_gpu_share():
    c = shared(0.25)
    assert trial_bundles(c) == [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 0.25}]
    from study.train import scaling_config

    sc = scaling_config(c)  # what trial_fn hands to the TorchTrainer; Ray validates it when it is built
    assert sc.use_gpu and sc.num_workers == 1 and sc.num_gpus_per_worker == 0.25
    assert sc._resources_per_worker_not_none == {"CPU": 1.0, "GPU": 0.25}
    # on CPU the share is ignored: no GPU is requested at all
    assert scaling_config(shared(0.25, use_gpu=False))._resources_per_worker_not_none == {"CPU": 1.0}


def test_an_autoscaling_cluster_packs_gpu_shares_per_node():
    cap = capacity_from_config(GPU_CLUSTER)  # 3 nodes of 8 CPU, 1 GPU
    assert cap.copies(trial_bundles(shared(0.25))) == 3 * 4  # 4 per node: 8 CPU // 2 and 1 GPU // 0.25
    assert cap.copies(trial_bundles(shared(0.5))) == 3 * 2
    assert cap.copies(trial_bundles(shared(0.25, cpus_per_worker=3))) == 3 * 2  # now the CPUs limit: 8 // 4
    check_capacity(shared(0.25), cap)


def test_impossible_gpu_shares_are_refused_in_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"^train.gpus_per_worker: 1.5 is neither a share of one GPU in \(0, 1\] "
                                          r"nor a whole number of GPUs"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["train.gpus_per_worker=1.5"])
    with pytest.raises(ConfigError, match=r"^train.gpus_per_worker = 0 is out of range"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["train.gpus_per_worker=0"])
    # a worker of 2 GPUs on a cluster whose nodes have one each: refused from the autoscaling config, no waiting
    with pytest.raises(ConfigError, match=r"needs 1 CPU, 2 GPU on one node.*gpu_worker: 8 CPU, 1 GPU\); lower "
                                          r"train.cpus_per_worker, train.gpus_per_worker"):
        check_capacity(shared(2.0), capacity_from_config(GPU_CLUSTER))

    # a cluster that is up: 5 workers of a quarter GPU need two GPUs, one is there; refused before any trial starts
    from study import runtime

    monkeypatch.setattr(runtime, "cluster_capacity", lambda: None)
    monkeypatch.setattr(runtime, "wait_for_resources", lambda bundles, **_: dict(ONE_GPU))
    with pytest.raises(ConfigError, match=r"^train.use_gpu with train.num_workers = 5 x train.gpus_per_worker = 0.25 "
                                          r"needs 2 GPUs but the Ray cluster has 1; lower"):
        runtime.check_cluster_fits(shared(0.25, num_workers=5))
    runtime.check_cluster_fits(shared(0.25, num_workers=4))  # four fit on the one GPU: no error


PLACE = """
import json, sys
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from study.config import load_config
from study.runtime import isolate_local_cluster, trial_bundles
isolate_local_cluster()  # a cluster of its own, not the test session's
ray.init(address="local", num_cpus=24, num_gpus=1, logging_level="ERROR", log_to_driver=False)  # a GPU it lacks
placed = {}
for share in sys.argv[1:]:
    cfg = load_config(None, ["train.use_gpu=true", "train.cpus_per_worker=1", f"train.gpus_per_worker={share}"])
    groups = []
    while True:  # one trial's placement group after another, until one is not placed within 3 s
        groups.append(placement_group(trial_bundles(cfg), strategy="PACK"))
        if not ray.wait([groups[-1].ready()], timeout=3)[0]:
            break
    placed[share] = len(groups) - 1
    for g in groups:
        remove_placement_group(g)
print(json.dumps(placed))
ray.shutdown()
"""


@pytest.mark.slow
def test_rays_scheduler_places_as_many_trials_on_a_declared_gpu_as_counted():
    """Ray itself, on a cluster that declares one GPU (there is none): the counts above are its counts."""
    import json
    import subprocess
    import sys

    shares = ["0.25", "0.3", "0.1"]
    r = subprocess.run([sys.executable, "-c", PLACE, *shares], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    placed = json.loads(r.stdout.strip().splitlines()[-1])
    cluster = {"CPU": 24.0, "GPU": 1.0}
    assert placed == {s: copies_in(cluster, trial_bundles(shared(float(s)))) for s in shares}
    assert placed == {"0.25": 4, "0.3": 3, "0.1": 10}  # by hand: floor(1 / share) per GPU; 24 CPUs hold 12 trials
