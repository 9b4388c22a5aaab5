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
from pathlib import Path

from study.config import StudyConfig
from trainables.errors import ConfigError, DataError

# The Tune function trainable itself holds one CPU while its TorchTrainer runs.
TRIAL_DRIVER_CPUS = 1.0


def init_ray(cfg: StudyConfig) -> None:
    """Connect to ``ray.address`` or start a local cluster with ``ray.num_cpus`` logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables; we print per epoch
    kwargs = {"logging_level": "WARNING", "log_to_driver": cfg.ray.worker_logs}
    if cfg.ray.address is None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
        # A new local cluster turns token authentication on and says so on every start; keep it on, unsaid.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # Tune + Train start a handful of worker processes per trial; the raylet warns when more than
        # 4x this many are starting (default: the physical cores, 2 here) although nothing is wrong.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(4, cfg.ray.num_cpus or 0)))
    try:
        ray.init(address=cfg.ray.address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at ray.address = {cfg.ray.address!r}: {exc}") from None


def storage_path(cfg: StudyConfig) -> str:
    """Absolute local path (created and checked writable) or a remote URI, unchanged."""
    raw = cfg.ray.storage_path
    if "://" in raw:
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
    cpus = float(cfg.train.cpus_per_worker)
    return {"CPU": cpus, "GPU": 1.0} if cfg.train.use_gpu else {"CPU": cpus}


def check_local_prerequisites(cfg: StudyConfig) -> None:
    """Checks that need no cluster: a GPU requested on a GPU-less local machine, data present."""
    if cfg.ray.address is None and cfg.train.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.use_gpu is true but this machine has no CUDA GPU; set train.use_gpu=false")
    if cfg.ray.address is None:
        check_data_present(cfg)


def check_data_present(cfg: StudyConfig) -> None:
    """A missing dataset (with downloads off) fails here, not inside a worker."""
    d = cfg.data
    if d.name == "shapes" or d.download:
        return
    from torchvision.datasets import CIFAR100, Places365

    expected = (
        Path(d.root) / CIFAR100.base_folder if d.name == "cifar100" else Path(d.root) / Places365._CATEGORIES_META[0]
    )
    if not expected.exists():
        raise DataError(
            f"{d.name} was not found under {d.root} (expected {expected.name}); set data.download=true on a "
            "machine with internet access, or place the dataset there, or set data.root to where it is"
        )


def has_autoscaler() -> bool:
    """Whether the connected cluster can add nodes: an autoscaler with declared node types.

    Every cluster's monitor publishes a status report in the GCS; a cluster that
    cannot grow (``ray.init()``, a plain ``ray start``) names each node after its
    id (``node_<id>``), one started from an autoscaling config (``ray up``) by its
    node type (``ray.head.default``, ``gpu_worker``).
    """
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not status:
        return False
    mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(name != f"node_{node}" for node, name in mapping.items())


def _holds(total: dict[str, float], bundles: list[dict[str, float]]) -> bool:
    return all(total.get(k, 0.0) >= sum(b.get(k, 0.0) for b in bundles) for b in bundles for k in b)


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0.0):g} {k}" for k in ("CPU", "GPU") if k in resources or k == "CPU")


def wait_for_resources(bundles: list[dict[str, float]], *, what: str, timeout_s: float,
                       echo: Callable[[str], None] = print) -> dict[str, float]:
    """The cluster's resources once they hold ``bundles`` (summed), or when waiting is pointless.

    A cluster without an autoscaler is what it is: its resources are returned at
    once. An autoscaling one (``ray up`` with ``min_workers: 0``: no worker and
    no CPU until a demand appears) is asked for the bundles with
    ``ray.autoscaler.sdk.request_resources``, and this waits, printing progress,
    until they are there or ``timeout_s`` passes; the request is withdrawn
    afterwards (the work's own demand then keeps the nodes).
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    total = ray.cluster_resources()
    if _holds(total, bundles) or not has_autoscaler() or timeout_s <= 0:
        return total
    need = {k: sum(b.get(k, 0.0) for b in bundles) for b in bundles for k in b}
    echo(f"waiting up to {timeout_s:g} s for the autoscaler to start nodes for {what} ({_describe(need)}; "
         f"the cluster has {_describe(total)} now)")
    request_resources(bundles=bundles)
    start = last = time.monotonic()
    try:
        while not _holds(total, bundles) and time.monotonic() - start < timeout_s:
            time.sleep(1.0)
            total = ray.cluster_resources()
            if time.monotonic() - last >= 15:
                last = time.monotonic()
                echo(f"  ... {last - start:.0f} s: the cluster has {_describe(total)}")
    finally:
        request_resources(bundles=[])
    if _holds(total, bundles):
        echo(f"the cluster has {_describe(total)} after {time.monotonic() - start:.0f} s")
    return total


def trial_bundles(cfg: StudyConfig) -> list[dict[str, float]]:
    """What one trial occupies: the trial's own driver CPU and each Train worker's resources."""
    return [{"CPU": TRIAL_DRIVER_CPUS}] + [worker_resources(cfg)] * cfg.train.num_workers


def check_cluster_fits(cfg: StudyConfig, echo: Callable[[str], None] = print) -> None:
    """Refuse a trial the Ray cluster could never place (it would wait forever).

    An autoscaling cluster is first asked to grow to one trial's size
    (:func:`wait_for_resources`, ``ray.scale_up_timeout_s``); only what it still
    cannot hold then is refused.
    """
    total = wait_for_resources(trial_bundles(cfg), what="one trial", timeout_s=cfg.ray.scale_up_timeout_s, echo=echo)
    per_worker = worker_resources(cfg)
    n = cfg.train.num_workers
    need_cpu = n * per_worker["CPU"] + TRIAL_DRIVER_CPUS
    have_cpu = total.get("CPU", 0.0)
    if cfg.train.use_gpu and total.get("GPU", 0.0) < n:
        raise ConfigError(
            f"train.use_gpu with train.num_workers = {n} needs {n} GPUs but the Ray cluster has "
            f"{int(total.get('GPU', 0))}; lower train.num_workers or set train.use_gpu=false"
        )
    if need_cpu > have_cpu:
        raise ConfigError(
            f"train.num_workers = {n} needs {need_cpu:g} CPUs ({n} workers x {per_worker['CPU']:g} + 1 for the trial) "
            f"but the Ray cluster has {have_cpu:g}; lower train.num_workers or train.cpus_per_worker, or raise "
            "ray.num_cpus"
        )
