"""Shared test fixtures: CPU only, tiny models and images."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# Tests write only under temporary directories: the checkout's own MLflow and output folders must not grow.
_WATCHED = ("mlruns", "mlartifacts", "outputs", "ray_results", "mlflow.db")


def _checkout_state() -> set[str]:
    found = set()
    for name in _WATCHED:
        path = ROOT / name
        if path.is_dir():
            found |= {str(p.relative_to(ROOT)) for p in path.rglob("*")}
        elif path.exists():
            found.add(f"{name}@{path.stat().st_size}")
    return found


def pytest_sessionstart(session):
    session.config._checkout_before = _checkout_state()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_checkout_before", None)
    if before is None or exitstatus not in (0,):
        return
    written = sorted(_checkout_state() - before)
    if written:
        print(f"\nerror: the tests wrote into the checkout ({len(written)} paths, first: {written[0]}); "
              "tests must write only under temporary directories", file=sys.stderr)
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Set by tests/test_exact_everywhere.py: keep the thread count its subprocess was started with.
KEEP_THREADS = "UNITSTUDY_KEEP_THREADS"


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (OpenMP spin-waits stall on a shared 2-core machine)."""
    if os.environ.get(KEEP_THREADS):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_study():
    """Run the ``study`` CLI in a subprocess; returns CompletedProcess (text)."""

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "study.cli", *args],
            capture_output=True,
            text=True,
            cwd=cwd or ROOT,
            timeout=300,
        )

    return run


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (4 logical CPUs on 2 cores, DESIGN.md).

    Ray Train's health-check interval is shortened so fault-injection tests spend
    less time waiting for the controller to notice a dead worker.

    Its processes are told their own address (``study.runtime.isolate_local_cluster``)
    while it starts, so that Ray Train's placement-group cleaner, which resolves
    ``address="auto"``, finds this cluster even while another runs on the machine
    (a test's own cluster, or anyone else's): it failed with "Found multiple active
    Ray instances", the placement groups of killed drivers and of trials ASHA
    stopped leaked, and a later trial waited forever for their CPUs. This
    process's later children do not inherit that address.

    Its dashboard agent listens on a free port (:func:`_free_agent_port`), so its
    job API (:func:`ray_dashboard`) works while another cluster runs on the machine.
    """
    import ray

    from study.runtime import isolate_local_cluster

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    try:
        with _free_agent_port():
            context = ray.init(address=isolate_local_cluster(), num_cpus=4, log_to_driver=False,
                               logging_level="WARNING")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _SESSION_CLUSTER["dashboard"] = f"http://{context.dashboard_url}"
    yield ray
    ray.shutdown()


_SESSION_CLUSTER: dict[str, str] = {}


@contextlib.contextmanager
def _free_agent_port():
    """A new local cluster's dashboard agent on a free port instead of Ray's fixed 52365.

    Every node's agent serves the job API (a job's supervisor and its logs) on that
    port; a second cluster on the machine cannot bind it, its head then answers every
    submission with "No available agent to submit job". ``ray start`` takes
    ``--dashboard-agent-listen-port``; ``ray.init`` does not, so the port is given to
    the one ``RayParams`` it builds for the new cluster.
    """
    from ray._private import parameter

    init = parameter.RayParams.__init__
    port = free_port()

    def with_agent_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", port)
        init(self, *args, **kwargs)

    parameter.RayParams.__init__ = with_agent_port
    try:
        yield
    finally:
        parameter.RayParams.__init__ = init


@pytest.fixture(scope="session")
def ray_dashboard(ray_cluster) -> str:
    """The session cluster's dashboard (its job API), ``http://127.0.0.1:PORT``."""
    return _SESSION_CLUSTER["dashboard"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc, log_path: Path, what: str, timeout_s: float = 120) -> None:
    """Poll ``url`` until it answers (any HTTP status); fail with the log's tail if ``proc`` dies or time runs out."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    pytest.fail(f"{what} did not come up: {log_path.read_text()[-2000:]}")


def stop_process_group(proc) -> None:
    """End a test server and its children (its own process group): SIGKILL, as nothing of it is kept
    (uvicorn's graceful shutdown took 20 s)."""
    import os
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class S3Store:
    """An S3-compatible server on 127.0.0.1 (moto's standalone server) that checks credentials.

    ``env``: the standard variables that point boto3, pyarrow (Ray's storage) and
    MLflow at it with a key it accepts; ``bucket`` exists, empty at the start.
    """

    def __init__(self, endpoint: str, key_id: str, secret: str, bucket: str):
        self.endpoint, self.key_id, self.secret, self.bucket = endpoint, key_id, secret, bucket
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint,
                    "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, **credentials):
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=credentials.get("key_id", self.key_id),
            aws_secret_access_key=credentials.get("secret", self.secret))

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """One S3-compatible server for the session: moto's, with IAM authentication on after 3 unchecked calls
    (which create the user, its policy and the access key the tests use), so wrong credentials are refused."""
    import json
    import os

    import boto3

    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(root / "moto.log", "w")
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    try:
        wait_for_http(f"{endpoint}/moto-api/", proc, root / "moto.log", "the S3 server (moto)")
        iam = boto3.session.Session().client("iam", endpoint_url=endpoint, region_name="us-east-1",
                                             aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="unitstudy")
        iam.put_user_policy(UserName="unitstudy", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="unitstudy")["AccessKey"]
        store = S3Store(endpoint, key["AccessKeyId"], key["SecretAccessKey"], "unitstudy-test")
        store.client().create_bucket(Bucket=store.bucket)
        yield store
    finally:
        stop_process_group(proc)
        log.close()


@pytest.fixture
def s3_env(s3_store, monkeypatch):
    """This process pointed at the session's S3 server (the standard variables, restored afterwards)."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    return s3_store


def start_mlflow_server(root: Path, artifacts_destination: str, env: dict | None = None):
    """``mlflow server`` on 127.0.0.1 (sqlite backend in ``root``); returns (uri, process). Stop it with
    :func:`stop_process_group`."""
    import os

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", artifacts_destination],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root, env={**os.environ, **(env or {})})
    log.close()
    try:
        wait_for_http(f"{uri}/health", proc, root / "server.log", "mlflow server")
    except BaseException:
        stop_process_group(proc)
        raise
    return uri, proc


@pytest.fixture(scope="session")
def mlflow_server(s3_store, tmp_path_factory):
    """One ``mlflow server`` for the session, as ``cluster.yaml`` runs it on the head: a sqlite backend and
    ``--artifacts-destination s3://<bucket>/mlflow`` on the session's S3 server. (uri, artifact key prefix)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    uri, proc = start_mlflow_server(root, f"s3://{s3_store.bucket}/mlflow", env=s3_store.env)
    yield uri, "mlflow/"
    stop_process_group(proc)


def kill_when_stopped(args: list[str], *, cwd: Path, env: dict, marker: Path, what: str, timeout_s: float = 240) -> None:
    """Run ``args`` until it writes ``marker`` (a ``trainables.loop.STOP_ENV`` point: it waits there), then
    SIGKILL it; ``what`` names the point in a failure."""
    import signal
    import time

    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout_s
        while not marker.exists():
            assert proc.poll() is None, f"the command ended before {what}: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, f"the command never reached {what}"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
