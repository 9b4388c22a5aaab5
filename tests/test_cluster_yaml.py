"""cluster.yaml validates with Ray's own autoscaler schema, offline, and keeps the promises the README makes."""

import copy
import re

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .conftest import ROOT

RAW = (ROOT / "cluster.yaml").read_text()


def test_cluster_yaml_passes_rays_validation():
    validate_config(prepare_config(yaml.safe_load(RAW)))


def test_the_validation_can_fail():
    broken = yaml.safe_load(RAW)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    with pytest.raises(Exception):
        validate_config(prepare_config(copy.deepcopy(broken)))


def test_image_matches_the_installed_ray_and_is_a_gpu_image():
    image = yaml.safe_load(RAW)["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_mlflow_server_is_bound_to_loopback_and_storage_is_shared():
    assert re.search(r"mlflow server --host 127\.0\.0\.1 --port 5000", RAW)
    assert "s3://" in RAW and "pip install -q -e /home/ray/unitstudy" in RAW


def test_no_secrets_in_the_file():
    lowered = RAW.lower()
    for needle in ("aws_secret_access_key", "aws_access_key_id", "password", "token:"):
        assert needle not in lowered
    assert not re.search(r"AKIA[0-9A-Z]{16}", RAW), "no AWS access key ids"


def test_gpu_workers_can_write_to_the_bucket_and_refuse_to_run_without_cuda():
    config = yaml.safe_load(RAW)
    worker = config["available_node_types"]["gpu_worker"]["node_config"]
    assert "IamInstanceProfile" in worker, "workers write checkpoints and artifacts to s3://"
    assert worker["ImageId"].startswith("ami-"), "an AMI whose NVIDIA driver fits the torch wheel"
    (check,) = config["worker_setup_commands"]
    assert "torch.cuda.is_available()" in check and "sys.exit(" in check
