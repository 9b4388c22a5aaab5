"""Starting Ray and checking, before anything can hang, that a study fits the cluster.

Ray Train V2 waits indefinitely for resources it cannot get, so every check that
would otherwise surface as a hang (too many workers, a GPU that is not there, a
dataset that is missing, storage that cannot be written) runs here first and
raises one clear error.
"""

from __future__ import annotations

import logging
import os
import uuid
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


def check_cluster_fits(cfg: StudyConfig, trials_at_once: int = 1) -> None:
    """Refuse a trial the running Ray cluster could never place (it would wait forever)."""
    import ray

    total = ray.cluster_resources()
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
