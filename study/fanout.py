"""Fanning analysis work out as Ray tasks: one module for ``ablate``, ``intervene`` and ``dissect``.

* Splits (:class:`Split`): the test split (reported) or the validation images a
  checkpoint's training held out (chosen on), with their evaluation batches.
* Shared inputs: the state dict and each split's images are ``ray.put`` once
  per command (:func:`put_shared`); tasks receive them resolved.
* Task resources (:func:`task_resources`): a GPU share per task where the
  cluster has (or can grow) GPUs; GPU tasks own their GPU (:func:`remote_task`,
  ``max_calls=1``); Ray retries failed tasks (``ablation.max_retries``).
* Resumable parts (:func:`fan_out`): each finished task's result is written to
  ``<out>/parts/<job>/<key>.pt`` as it lands, and the job's grid is fixed in
  ``plan.json`` (:func:`job_plan`) on the first run, so a rerun after a crash
  (or a kill) computes only the missing parts. A tqdm bar follows ``ray.wait``;
  the first task error cancels the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from study.config import StudyConfig
from study.sources import Source, expected_architecture
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.errors import ConfigError, UnitstudyError

__all__ = [
    "FanOut", "MIN_SHARD_IMAGES", "Shared", "Split", "chunks", "common_job", "default_shards", "eval_batch_size",
    "eval_batches", "fan_out", "job_hash", "job_plan", "open_task", "put_shared", "remote_function", "remote_task",
    "report_split",
    "shard_bounds", "split_arrays", "split_labels", "task_resources", "validation_split",
]

# Fewest images worth a data shard of their own (below this, task overhead dominates).
MIN_SHARD_IMAGES = 32


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """Images to evaluate: ``indices`` into the train or test split of ``cfg.data``.

    Attributes:
        name: "test" (reported, never chosen on) or "val" (the validation images
            held out of training, :func:`trainables.data.split_of`; units are selected on them).
        train: which split of the dataset the indices address.
        indices: (N,) int64, sorted.
    """

    name: str
    train: bool
    indices: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.indices.numel()


def split_labels(cfg: StudyConfig, train: bool) -> torch.Tensor:
    """(N,) int64 labels of the dataset's train or test split."""
    from trainables.datasets import dataset_spec

    return dataset_spec(cfg.data.name).labels(cfg.data, train)


def report_split(cfg: StudyConfig) -> Split:
    """Every image of the dataset's test split (the report split)."""
    return Split("test", False, torch.arange(split_labels(cfg, train=False).numel()))


def validation_split(cfg: StudyConfig) -> Split:
    """The validation images the checkpoint's training held out (``data.val_fraction``, ``data.seed``).

    ``data`` comes from the checkpoint's own config (:func:`study.sources.study_config`), so
    these are exactly the images its training loader never saw.
    """
    from trainables.data import split_of

    if cfg.data.val_fraction == 0:
        raise ConfigError(
            "selecting units needs validation images the model was not trained on, but data.val_fraction = 0 "
            "(the checkpoint was trained on the whole training split); train with data.val_fraction > 0"
        )
    _, val = split_of(cfg.data, split_labels(cfg, train=True))
    return Split("val", True, val)


def split_arrays(cfg: StudyConfig, split: Split) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(uint8 images, labels) of the whole split for in-memory datasets; (None, None) for streamed ones."""
    from trainables.datasets import dataset_spec

    spec = dataset_spec(cfg.data.name)
    if not spec.in_memory:
        return None, None
    return spec.arrays(cfg.data, train=split.train)


def eval_batches(data: dict, images, labels, train: bool, indices: torch.Tensor, batch_size: int, device):
    """Evaluation batches (no augmentation, fixed order) of ``indices``, on ``device``."""
    from trainables.data import DeviceLoader, SamplerLoader
    from trainables.datasets import as_data_config, dataset_spec

    data = as_data_config(data)
    spec = dataset_spec(data.name)
    if images is not None:
        mean, std = spec.mean_std
        return DeviceLoader(images[indices], labels[indices], batch_size=batch_size, device=device, mean=mean,
                            std=std, train=False, augment=False)
    from torch.utils.data import Subset

    ds = spec.dataset(data, train, augment=False)
    return SamplerLoader(Subset(ds, indices.tolist()), batch_size=batch_size, device=device, train=False,
                         num_workers=data.loader_workers)


def eval_batch_size(cfg: StudyConfig) -> int:
    return 256 if cfg.model.variant == "cifar" else 64


# --------------------------------------------------------------------------- shared inputs and jobs


@dataclass
class Shared:
    """ObjectRefs put once per command: the state dict and each split's (images, labels).

    In-memory datasets put only the split's own images (``images[split.indices]``),
    so tasks address them by position; streamed datasets (places365) read files by dataset index.
    """

    state: Any
    arrays: dict[str, tuple[Any, Any]]
    in_memory: bool

    def indices(self, split: Split, lo: int, hi: int) -> torch.Tensor:
        """What a task over positions ``lo:hi`` of ``split`` indexes its images with."""
        return torch.arange(lo, hi) if self.in_memory else split.indices[lo:hi]


def put_shared(cfg: StudyConfig, source: Source, splits: Sequence[Split]) -> Shared:
    from trainables.datasets import dataset_spec

    arrays = {}
    for split in splits:
        images, labels = split_arrays(cfg, split)
        if images is not None:
            images, labels = images[split.indices], labels[split.indices]
        arrays[split.name] = (ray.put(images), ray.put(labels))
    return Shared(ray.put(dict(source.state_dict)), arrays, dataset_spec(cfg.data.name).in_memory)


def common_job(cfg: StudyConfig, split: Split) -> dict:
    """What every counting task of ``split`` needs besides its own units or interventions and indices."""
    return {
        "data": cfg.dump()["data"],
        "train": split.train,
        "batch_size": eval_batch_size(cfg),
        "num_classes": cfg.num_classes,
        "expected": expected_architecture(cfg),
        "layer": cfg.ablation.layer,
        "dtype": cfg.ablation.dtype,
    }


def open_task(state_dict: dict, job: dict) -> tuple[torch.nn.Module, str]:
    """Inside a task: (the checkpoint's model on this task's device, the device).

    ``job["fail_marker"]`` (tests) makes the first attempt fail, leaving the marker
    file, so Ray's retries must finish the job. ``job["hold"]`` (tests, from
    :data:`HOLD_ENV`) holds the task until the test releases it (:func:`wait_for_release`).
    """
    from analysis.evaluation import model_from_state_dict

    hold = job.get("hold")
    if hold:
        wait_for_release(Path(hold), job["key"])
    marker = job.get("fail_marker")
    if marker and not Path(marker).exists():
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text("failed once")
        raise RuntimeError(f"injected fault in {Path(marker).name} (first attempt)")
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    return model_from_state_dict(state_dict, device=device, **job["expected"]), device


# A test hook: a directory set in the driver's environment holds every task of the command until the test
# releases it, so that a kill test can stop the driver with chosen parts saved and others running.
HOLD_ENV = "UNITSTUDY_TEST_HOLD"


def wait_for_release(hold: Path, key: str, timeout_s: float = 300.0) -> None:
    """Write ``hold/started-<key>``, then wait for ``hold/go-<key>`` (run on) or ``hold/abort`` (fail at once)."""
    hold.mkdir(parents=True, exist_ok=True)
    (hold / f"started-{key}").write_text("")
    deadline = time.time() + timeout_s
    while not (hold / f"go-{key}").exists():
        if (hold / "abort").exists() or time.time() > deadline:
            raise RuntimeError(f"task {key} held by {HOLD_ENV} was aborted or never released")
        time.sleep(0.05)


# --------------------------------------------------------------------------- grids


def chunks(units: list[int], size: int) -> list[list[int]]:
    return [units[i : i + size] for i in range(0, len(units), size)]


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    return [(i * n // shards, (i + 1) * n // shards) for i in range(shards)]


def default_shards(n_images: int, n_chunks: int, slots: int, min_images: int = MIN_SHARD_IMAGES) -> int:
    """Data shards: fill the cluster's slots (divided among unit chunks), ``min_images`` or more each."""
    return max(1, min(math.ceil(slots / n_chunks), n_images // min_images))


def job_hash(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, default=lambda t: t.tolist() if torch.is_tensor(t) else str(t))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def job_plan(parts_dir: Path | None, identity: dict, make: Callable[[], dict]) -> dict:
    """The job's grid: read back from ``plan.json`` when resuming the same job, else made now and saved."""
    if parts_dir is None:
        return make()
    file = parts_dir / "plan.json"
    if file.is_file():
        saved = json.loads(file.read_text())
        if saved.get("identity_hash") == job_hash(identity):
            return saved["grid"]
    grid = make()
    parts_dir.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"identity_hash": job_hash(identity), "grid": grid}, indent=1))
    return grid


# --------------------------------------------------------------------------- tasks


def remote_task(function: Callable, gpus: float, max_retries: int, **options: Any):
    """``function`` as a Ray task with a ``gpus`` share, ready for ``.remote``.

    A GPU task is declared with ``max_calls=1``: its worker process exits after
    the task, so the next task starts with a fresh CUDA context on the GPU Ray
    assigns it (Ray forces this only for ``num_gpus`` given in ``@ray.remote``, and
    refuses ``max_calls`` in ``.options``; a reused worker would keep its first GPU
    and its cached memory). CPU tasks reuse their workers.
    """
    return remote_function(function, gpus).options(num_gpus=gpus, max_retries=max_retries, retry_exceptions=True,
                                                   **options)


def remote_function(function: Callable, gpus: float):
    """The Ray remote function of ``function`` for tasks with (``max_calls=1``) or without a GPU; made once."""
    key = (function, gpus > 0)
    if key not in _REMOTE:
        _REMOTE[key] = ray.remote(max_retries=3, retry_exceptions=True, **({"max_calls": 1} if gpus > 0 else {}))(
            function)
    return _REMOTE[key]


_REMOTE: dict[tuple[Callable, bool], Any] = {}
_WAITED: set[tuple[str, float]] = set()


def task_resources(cfg: StudyConfig) -> tuple[float, int]:
    """(num_gpus per task, tasks the cluster runs at once).

    An autoscaling cluster whose config can be read is planned for at the size
    it may grow to (the pending tasks are the demand that grows it; a GPU share
    on a cluster with no GPU node type means CPU tasks). Where the config cannot
    be read and the workers have idled out, the nodes for one task (with its GPU
    share, when ``ablation.num_gpus`` > 0) are asked for first, so the plan is
    made for the cluster the tasks will run on.
    """
    from study.runtime import cluster_capacity, wait_for_resources

    capacity = cluster_capacity()
    key = (ray.get_runtime_context().get_job_id(), cfg.ablation.num_gpus)
    if capacity is None and key not in _WAITED:  # wait at most once per command: a GPU that did not come won't
        bundle = {"CPU": 1.0, **({"GPU": cfg.ablation.num_gpus} if cfg.ablation.num_gpus > 0 else {})}
        wait_for_resources([bundle], what="an analysis task", timeout_s=cfg.ray.scale_up_timeout_s)
        _WAITED.add(key)
    total = ray.cluster_resources()
    if capacity is not None:
        grown = capacity.total()
        total = {k: max(total.get(k, 0.0), grown.get(k, 0.0)) for k in set(total) | set(grown)}
    gpus = cfg.ablation.num_gpus if total.get("GPU", 0) > 0 else 0.0
    slots = int(total.get("GPU", 0) // gpus) if gpus > 0 else int(total.get("CPU", 1))
    return gpus, max(1, slots)


@dataclass
class FanOut:
    """What :func:`fan_out` did: the parts' results by key, and which were computed now or reused."""

    results: dict[str, Any]
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # num_returns > 1: the other returns' refs, by key
    precision: tuple[int, int] = (0, 0)  # ablation: (unit, image) pairs re-checked in float64, and how many differ


def fan_out(
    cfg: StudyConfig,
    task: Callable,
    jobs: dict[str, tuple],
    *,
    parts_dir: Path | None,
    desc: str,
    quiet: bool = False,
    num_returns: int = 1,
) -> FanOut:
    """Run ``task(*args)`` for every ``key -> args`` in ``jobs`` not already saved in ``parts_dir``.

    Each result is saved to ``parts_dir / f"{key}.pt"`` the moment it lands (a
    kill loses only the running tasks). Top-level ObjectRefs in ``args`` reach
    the task resolved. With ``num_returns`` > 1 only the first return is fetched
    and saved; the others stay in the object store, their refs in ``FanOut.extra``
    (a later pass may use them; after a resume they are absent). A task's
    :class:`UnitstudyError` is raised as itself, after the rest are cancelled.
    """
    out = FanOut({})
    todo = {}
    for key, args in jobs.items():
        part = parts_dir / f"{key}.pt" if parts_dir is not None else None
        if part is not None and part.is_file():
            out.results[key] = load_checkpoint(part)
            out.reused.append(key)
        else:
            todo[key] = args
    if not todo:
        return out
    remote = remote_task(task, task_resources(cfg)[0], cfg.ablation.max_retries,
                         **({"num_returns": num_returns} if num_returns > 1 else {}))
    pending = {}
    hold = os.environ.get(HOLD_ENV)
    for key, args in todo.items():
        if hold:  # the job dict is every task's last argument
            args = (*args[:-1], {**args[-1], "hold": hold, "key": key})
        refs = remote.remote(*args)
        if num_returns > 1:
            refs, out.extra[key] = refs[0], refs[1:]
        pending[refs] = key
    from tqdm import tqdm

    with tqdm(total=len(jobs), initial=len(out.reused), desc=desc, unit="task", disable=quiet,
              file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                key = pending.pop(done[0])
                state = ray.get(done[0])
                if parts_dir is not None:
                    save_checkpoint(parts_dir / f"{key}.pt", state)
                out.results[key] = state
                out.computed.append(key)
                bar.update(1)
        except ray.exceptions.RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref)
            if isinstance(exc.cause, UnitstudyError):
                raise exc.cause from None
            raise
    return out
