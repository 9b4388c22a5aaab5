"""What an autoscaling cluster can grow to, read from its config: checked against hand-counted clusters."""

import pytest

from study.config import StudyConfig, load_config
from study.runtime import HEAD, capacity_from_config, check_capacity, trial_bundles
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
