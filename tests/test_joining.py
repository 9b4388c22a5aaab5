"""Joining a cluster the kit did not start: token authentication and the raylet's worker-start notices.

The session's Ray cluster (conftest.py) is a new local cluster, which Ray 2.60
starts with token authentication on (``RAY_AUTH_MODE=token`` in this process,
the token in ``~/.ray/auth_token``). A driver that names its address without
token mode, or with another token, is refused by its GCS.
"""

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture
def token_cluster(ray_cluster):
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("the session's Ray cluster runs without token authentication (RAY_AUTH_MODE is set otherwise)")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    return ray_cluster.get_runtime_context().gcs_address, env


def test_an_address_that_wants_a_token_is_one_line_naming_RAY_AUTH_MODE(token_cluster, tmp_path):
    address, env = token_cluster
    env.pop("RAY_AUTH_MODE")
    out = subprocess.run([sys.executable, "-m", "study.cli", "train", "--config", str(QUICKSTART),
                          "--set", f"ray.address={address}", "--set", f"ray.storage_path={tmp_path}/ray",
                          "--set", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == [
        f"error: the Ray cluster at ray.address = {address} requires token authentication; set RAY_AUTH_MODE=token "
        "and give this machine the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as on "
        "the head)"], "one line, not Ray's refusals every second for 20 s"


def test_a_wrong_token_is_one_line_and_the_right_one_passes(token_cluster):
    address, env = token_cluster
    probe = "import sys; from study.joining import check_ray_auth; check_ray_auth(sys.argv[1]); print('passed')"
    wrong = subprocess.run([sys.executable, "-c", probe, address], cwd=ROOT, capture_output=True, text=True,
                           env={**env, "RAY_AUTH_TOKEN": "0" * 32}, timeout=60)
    assert wrong.returncode == 1 and "passed" not in wrong.stdout
    assert (f"ConfigError: the Ray cluster at ray.address = {address} refuses this machine's token "
            "(RAY_AUTH_MODE=token)") in wrong.stderr
    from study.joining import check_ray_auth

    check_ray_auth(address)  # this process holds the cluster's token: no error


def test_the_raylets_worker_start_notice_is_dropped_and_its_other_messages_kept(monkeypatch, capsys):
    from ray._private import worker

    from study.joining import quiet_startup_notices

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # restored afterwards
    quiet_startup_notices()
    quiet_startup_notices()  # idempotent: one filter, not two
    notice = ("WARNING: 12 PYTHON worker processes have been started on node: 5f2a with address: 10.0.0.3. This "
              "could be a result of using a large number of actors, or due to tasks blocked in ray.get() calls")
    worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert notice not in capsys.readouterr().out
    other = "A worker died or was killed while executing a task by an unexpected system error."
    worker.print_to_stdstream({"lines": [notice, other], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    printed = capsys.readouterr().out
    assert other in printed and notice not in printed
