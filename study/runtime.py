"""Starting Ray and checking, before anything can hang, that a study fits the cluster.

Ray Train V2 waits indefinitely for resources it cannot get, so every check that
would otherwise surface as a hang (too many workers, a GPU that is not there, a
dataset that is missing, storage that cannot be written) runs here first and
raises one clear error.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from study.config import StudyConfig
from study.jobs import job_working_dir
from study.joining import check_ray_auth, quiet_startup_notices
from study.storage import check_writable, is_remote, worker_env
from trainables.errors import ConfigError

# The Tune function trainable itself holds one CPU while its TorchTrainer runs.
TRIAL_DRIVER_CPUS = 1.0


def init_ray(cfg: StudyConfig) -> None:
    """Connect to ``ray.address`` (or ``$RAY_ADDRESS``), else start a local cluster with ``ray.num_cpus``
    logical CPUs, isolated from any other on this machine (:func:`isolate_local_cluster`)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables; we print per epoch
    kwargs = {"logging_level": "WARNING", "log_to_driver": cfg.ray.worker_logs}
    address = cfg.ray.address
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = isolate_local_cluster()
    if address != "local":
        check_ray_auth(address or os.environ.get("RAY_ADDRESS", ""))
        env = worker_env()
        if env:  # the object store's endpoint and credentials, for workers on nodes that lack them
            kwargs["runtime_env"] = {"env_vars": env}
    if address == "local":
        kwargs["num_cpus"] = cfg.ray.num_cpus
        # A new local cluster turns token authentication on and says so on every start; keep it on, unsaid.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # Tune + Train start a handful of worker processes per trial; the raylet warns when more than
        # 4x this many are starting (default: the physical cores, 2 here) although nothing is wrong.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(4, cfg.ray.num_cpus or 0)))
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at ray.address = {cfg.ray.address!r}: {exc}") from None
    quiet_startup_notices()


def isolate_local_cluster() -> str:
    """Prepare a new local cluster that no other cluster on this machine can be mistaken for.

    Ray resolves ``address="auto"`` by looking for running GCS processes; with two
    local clusters on one machine (two ``study`` commands at once) it finds both,
    and Ray Train's placement-group cleaner, which asks the state API that way,
    retries forever. The cluster's GCS port is chosen here and ``RAY_ADDRESS``
    names it before the cluster starts, so every process of the cluster (they
    inherit this environment) resolves its own. Returns ``"local"`` (start a new
    cluster, whatever ``RAY_ADDRESS`` says).
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    return "local"


def storage_path(cfg: StudyConfig) -> str:
    """Absolute local path (created and checked writable) or a remote URI (checked writable), unchanged."""
    raw = cfg.ray.storage_path
    if is_remote(raw):
        check_writable(raw)  # a missing bucket or refused credentials: one line, before Ray starts
        return raw
    path = Path(raw).expanduser().resolve()
    probe = path / f".write-probe-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"ray.storage_path = {raw} is not writable ({exc.strerror}); choose another directory") from None
    return str(path)


def with_absolute_paths(cfg: StudyConfig) -> StudyConfig:
    """A copy of ``cfg`` whose local ``data.root`` and ``dissection.broden_root`` are absolute.

    Ray Train V2 runs each worker in a directory of its own, so a relative root
    (``data`` in the shipped configs) would be looked up there, not where the user
    ran ``study``; resolving it on the driver, before anything is sent to a
    worker, makes every worker read the directory the driver checked. URIs
    (``s3://...``) are left as they are.
    """
    out = cfg.model_copy(deep=True)
    if "://" not in out.data.root:
        out.data.root = str(Path(out.data.root).expanduser().resolve())
    if out.dissection.broden_root and "://" not in out.dissection.broden_root:
        out.dissection.broden_root = str(Path(out.dissection.broden_root).expanduser().resolve())
    return out


def worker_resources(cfg: StudyConfig) -> dict[str, float]:
    """One Train worker's reservation: ``train.cpus_per_worker`` CPUs, with ``use_gpu`` ``gpus_per_worker`` GPUs."""
    cpus = float(cfg.train.cpus_per_worker)
    return {"CPU": cpus, "GPU": float(cfg.train.gpus_per_worker)} if cfg.train.use_gpu else {"CPU": cpus}


# Ray counts resources in units of 1e-4 (``ray._raylet.RESOURCE_UNIT_SCALING``); counting in them keeps
# 1 // 0.1 from coming out as 9.
RESOURCE_UNIT = 10_000


def _units(x: float) -> int:
    return round(x * RESOURCE_UNIT)


def gpu_slots(gpus: float, share: float) -> int:
    """How many workers of ``share`` GPUs each fit on ``gpus`` GPUs (one node's, or a cluster's summed).

    Ray assigns a share below 1 from a single GPU, so each whole GPU holds
    floor(1 / share) of them (0.25: 4; 0.3: 3, a tenth of each GPU left idle);
    a whole-number share takes that many whole GPUs.
    """
    if share <= 1:
        return int(gpus + 1e-9) * (RESOURCE_UNIT // _units(share))
    return int(gpus + 1e-9) // round(share)


def copies_in(resources: dict[str, float], bundles: list[dict[str, float]]) -> int:
    """How many copies of ``bundles`` (one trial, one task) ``resources`` hold, GPU shares packed per GPU."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            if k != "GPU":
                need[k] = need.get(k, 0.0) + v
    counts = [_units(resources.get(k, 0.0)) // _units(v) for k, v in need.items() if _units(v) > 0]
    shares = [b["GPU"] for b in bundles if b.get("GPU", 0.0) > 0]
    for share in set(shares):
        counts.append(gpu_slots(resources.get("GPU", 0.0), share) // shares.count(share))
    return int(min(counts)) if counts else 1


def check_local_prerequisites(cfg: StudyConfig) -> None:
    """Checks that need no cluster, where ``study`` starts its own: a GPU requested on a GPU-less machine, data
    present. A Ray job's driver joins the job's cluster (Ray sets ``RAY_ADDRESS``) even without ``ray.address``:
    the head it runs on may have no GPU and no data, and the workers need them, not it."""
    if cfg.ray.address is not None or job_working_dir() is not None:
        return
    if cfg.train.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.use_gpu is true but this machine has no CUDA GPU; set train.use_gpu=false")
    check_data_present(cfg)


def check_data_present(cfg: StudyConfig) -> None:
    """A missing dataset (with downloads off) fails here, not inside a worker."""
    from trainables.datasets import dataset_spec

    dataset_spec(cfg.data.name).check_present(cfg.data)


def _autoscaling_status() -> dict:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(status) if status else {}


def has_autoscaler() -> bool:
    """Whether the connected cluster can add nodes: an autoscaler with declared node types.

    Every cluster's monitor publishes a status report in the GCS; a cluster that
    cannot grow (``ray.init()``, a plain ``ray start``) names each node after its
    id (``node_<id>``), one started from an autoscaling config (``ray up``) by its
    node type (``ray.head.default``, ``gpu_worker``).
    """
    mapping = (_autoscaling_status().get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(name != f"node_{node}" for node, name in mapping.items())


@dataclass(frozen=True)
class NodeType:
    """One entry of an autoscaling config's ``available_node_types``."""

    name: str
    resources: dict[str, float]
    max_count: int  # nodes of this type the cluster may run (the head: 1)


@dataclass(frozen=True)
class Capacity:
    """What an autoscaling cluster can grow to, from its autoscaling config."""

    node_types: tuple[NodeType, ...]
    max_workers: int  # the config's cluster-wide cap on worker nodes

    def fits_one_node(self, bundle: dict[str, float]) -> bool:
        return any(_holds(t.resources, [bundle]) for t in self.node_types if t.max_count > 0)

    def per_node(self, bundles: list[dict[str, float]]) -> list[tuple[NodeType, int]]:
        """For each node type: how many whole copies of ``bundles`` one such node holds."""
        return [(t, copies_in(t.resources, bundles)) for t in self.node_types]

    def copies(self, bundles: list[dict[str, float]]) -> int:
        """How many copies of ``bundles`` (one trial, one task) the grown cluster runs at once.

        Packed node by node when one node holds a copy (so no copy is left waiting
        on scraps spread over several nodes), the biggest nodes first within the
        cluster's ``max_workers``; summed over the whole grown cluster otherwise
        (a trial whose workers must span nodes).
        """
        per = [(t, c) for t, c in self.per_node(bundles) if c > 0]
        if per:
            total, workers_left = 0, self.max_workers
            for t, c in sorted(per, key=lambda tc: -tc[1]):
                if t.name == HEAD:
                    total += c * t.max_count
                    continue
                n = min(t.max_count, workers_left)
                total += c * n
                workers_left -= n
            return total
        if not all(self.fits_one_node(b) for b in bundles):
            return 0
        return copies_in(self.total(), bundles)

    def total(self) -> dict[str, float]:
        """Every resource summed over the largest cluster the config allows."""
        out: dict[str, float] = {}
        workers_left = self.max_workers
        for t in sorted(self.node_types, key=lambda t: t.name != HEAD):
            n = t.max_count if t.name == HEAD else min(t.max_count, workers_left)
            if t.name != HEAD:
                workers_left -= n
            for k, v in t.resources.items():
                out[k] = out.get(k, 0.0) + n * v
        return out


HEAD = "__head__"


def capacity_from_config(config: dict) -> Capacity | None:
    """The :class:`Capacity` of an autoscaling config (as ``ray up`` writes it on the head), or None.

    None when a node type has no ``resources`` (Ray then detects them when the
    node starts, so its size is not known in advance).
    """
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    out = []
    for name, spec in types.items():
        resources = spec.get("resources")
        if resources is None or (name != head and not resources):
            return None
        is_head = name == head
        out.append(NodeType(HEAD if is_head else name, {k: float(v) for k, v in resources.items()},
                            1 if is_head else int(spec.get("max_workers", config.get("max_workers", 0)))))
    if not out:
        return None
    return Capacity(tuple(out), int(config.get("max_workers", sum(t.max_count for t in out if t.name != HEAD))))


def cluster_capacity() -> Capacity | None:
    """The connected autoscaling cluster's :class:`Capacity`, when its config can be read here.

    Ray 2.60's autoscaler (v1) does not publish its node types; the config is
    read from the command line of the cluster's monitor process, which works
    where ``study`` runs on the head (``ray up``, then ``ray attach`` or ``ray
    submit``). Elsewhere, and on clusters without an autoscaler, None: the
    checks then wait for nodes up to ``ray.scale_up_timeout_s``.
    """
    import yaml

    status = _autoscaling_status()
    pid = status.get("monitor_pid")
    if not pid or not has_autoscaler():
        return None
    try:
        argv = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, ValueError):
        return None
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--autoscaling-config=")), None)
    if path is None and "--autoscaling-config" in argv[:-1]:
        path = argv[argv.index("--autoscaling-config") + 1]
    if not path:
        return None
    try:
        config = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError):
        return None
    return capacity_from_config(config) if isinstance(config, dict) else None


def _holds(total: dict[str, float], bundles: list[dict[str, float]]) -> bool:
    return copies_in(total, bundles) >= 1


def describe_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0.0):g} {k}" for k in ("CPU", "GPU") if k in resources or k == "CPU")


def wait_for_resources(bundles: list[dict[str, float]], *, what: str, timeout_s: float,
                       echo: Callable[[str], None] = print) -> dict[str, float]:
    """The cluster's resources once they hold ``bundles`` (summed), or when waiting is pointless.

    A cluster without an autoscaler is what it is: its resources are returned at
    once. An autoscaling one (``ray up`` with ``min_workers: 0``: no worker and
    no CPU until a demand appears) is asked for the bundles with
    ``ray.autoscaler.sdk.request_resources``, and this waits, printing progress,
    until they are there or ``timeout_s`` passes; the request is withdrawn
    afterwards (the work's own demand then keeps the nodes). Where the
    autoscaling config can be read (:func:`cluster_capacity`), bundles that no
    node it can start would hold are not waited for.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    total = ray.cluster_resources()
    if _holds(total, bundles) or not has_autoscaler() or timeout_s <= 0:
        return total
    capacity = cluster_capacity()
    if capacity is not None and capacity.copies(bundles) == 0:
        return total  # no node the cluster can start would hold them: waiting is pointless
    need = {k: sum(b.get(k, 0.0) for b in bundles) for b in bundles for k in b}
    echo(f"waiting up to {timeout_s:g} s for the autoscaler to start nodes for {what} "
         f"({describe_resources(need)}; the cluster has {describe_resources(total)} now)")
    request_resources(bundles=bundles)
    start = last = time.monotonic()
    try:
        while not _holds(total, bundles) and time.monotonic() - start < timeout_s:
            time.sleep(1.0)
            total = ray.cluster_resources()
            if time.monotonic() - last >= 15:
                last = time.monotonic()
                echo(f"  ... {last - start:.0f} s: the cluster has {describe_resources(total)}")
    finally:
        request_resources(bundles=[])
    if _holds(total, bundles):
        echo(f"the cluster has {describe_resources(total)} after {time.monotonic() - start:.0f} s")
    return total


def trial_bundles(cfg: StudyConfig) -> list[dict[str, float]]:
    """What one trial occupies: the trial's own driver CPU and each Train worker's resources."""
    return [{"CPU": TRIAL_DRIVER_CPUS}] + [worker_resources(cfg)] * cfg.train.num_workers


def check_cluster_fits(cfg: StudyConfig, echo: Callable[[str], None] = print) -> None:
    """Refuse a trial the Ray cluster could never place (it would wait forever).

    An autoscaling cluster whose config can be read is judged by the nodes it can
    start (refused at once when none would hold a Train worker, or the grown
    cluster not a whole trial); otherwise it is first asked to grow to one
    trial's size (:func:`wait_for_resources`, ``ray.scale_up_timeout_s``) and
    only what it still cannot hold then is refused.
    """
    per_worker = worker_resources(cfg)
    n = cfg.train.num_workers
    capacity = cluster_capacity()
    if capacity is not None:
        check_capacity(cfg, capacity)
    total = wait_for_resources(trial_bundles(cfg), what="one trial", timeout_s=cfg.ray.scale_up_timeout_s, echo=echo)
    need_cpu = n * per_worker["CPU"] + TRIAL_DRIVER_CPUS
    have_cpu = total.get("CPU", 0.0)
    share = per_worker.get("GPU", 0.0)
    if share and gpu_slots(total.get("GPU", 0.0), share) < n:
        gpus = -(-n // gpu_slots(1, share)) if share <= 1 else n * round(share)
        raise ConfigError(
            f"train.use_gpu with train.num_workers = {n} x train.gpus_per_worker = {share:g} needs {gpus} GPUs but "
            f"the Ray cluster has {int(total.get('GPU', 0))}; lower train.num_workers or train.gpus_per_worker, "
            "or set train.use_gpu=false"
        )
    if need_cpu > have_cpu:
        raise ConfigError(
            f"train.num_workers = {n} needs {need_cpu:g} CPUs ({n} workers x {per_worker['CPU']:g} + 1 for the trial) "
            f"but the Ray cluster has {have_cpu:g}; lower train.num_workers or train.cpus_per_worker, or raise "
            "ray.num_cpus"
        )


def check_capacity(cfg: StudyConfig, capacity: Capacity) -> None:
    """Refuse, without waiting, a trial that no cluster this autoscaling config can grow to would hold."""
    per_worker = worker_resources(cfg)
    n = cfg.train.num_workers
    nodes = "; ".join(f"{t.name if t.name != HEAD else 'head'}: {describe_resources(t.resources)}"
                      for t in capacity.node_types)
    if not capacity.fits_one_node(per_worker):
        raise ConfigError(
            f"a Train worker needs {describe_resources(per_worker)} on one node, but no node type of this autoscaling "
            f"cluster has that ({nodes}); lower train.cpus_per_worker"
            + (", train.gpus_per_worker or set train.use_gpu=false" if cfg.train.use_gpu else "")
        )
    if capacity.copies(trial_bundles(cfg)) == 0:
        raise ConfigError(
            f"one trial needs {n} workers x ({describe_resources(per_worker)}) + 1 CPU, but this autoscaling cluster "
            f"grows to at most {describe_resources(capacity.total())} (max_workers {capacity.max_workers}; "
            f"{nodes}); lower "
            "train.num_workers or raise max_workers in the cluster config"
        )
