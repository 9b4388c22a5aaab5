"""``study ablate``: per-unit ablation of a trained checkpoint, fanned out as Ray tasks.

Paper: PAPER.md section 2 item 1 (the 512 x 365 matrix of per-class accuracy
with each conv5_3 unit removed). The computation is :func:`analysis.ablation.ablate_units`;
this module is the driver around it (DESIGN.md "Data flow" step 5):

1. :func:`resolve_source` finds the checkpoint: a ``checkpoint.pt`` path, or an
   MLflow run id whose ``checkpoint/checkpoint.pt`` artifact is downloaded. The
   run (found by its ``checkpoint_uri`` tag for a path) is linked from our run.
2. :func:`study_config` takes data and model from the checkpoint's own config
   (the images it was trained for), the other sections from ``--config`` (or
   the checkpoint's config), then ``--set``; the weights are checked against it.
3. :func:`fan_out` ``ray.put``s the state dict and the split's images once and
   launches one task per (unit chunk, data shard) with fractional ``num_gpus``
   (``.options(num_gpus=0)`` without GPUs), ``max_retries`` and
   ``retry_exceptions``; a tqdm bar follows ``ray.wait``. Each finished part is
   written to ``<out>/parts/<job>/`` at once, so a rerun after a crash computes
   only the missing parts (the grid is fixed in ``plan.json`` on the first run).
4. The driver merges the parts (:meth:`AblationCounts.merge`), writes the tidy
   table, the rankings and two figures, and logs them to one MLflow run tagged
   ``kind=ablation``, ``source_run_id`` and (when the source run has one) its
   ``mlflow.parentRunId``, so the ablation nests in the study that trained it.

Sharding: over data first (each task ablates all units of its chunk on one
shard); unit chunks (``ablation.unit_chunk``) only split the units, and every
chunk re-runs the trunk on its images, so the default uses one data shard per
free slot divided among the chunks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch

from analysis.counts import AblationCounts
from analysis.evaluation import model_from_state_dict
from analysis.hooks import check_units
from analysis.rankings import ALPHA, class_accuracy, rank_units, rank_units_per_class
from study.config import StudyConfig, apply_overrides, read_yaml, validate
from study.runtime import init_ray, with_absolute_paths
from study.tracking import PARENT_TAG, client, experiment_id, flatten, git_commit
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.errors import CheckpointError, ConfigError, UnitstudyError

__all__ = [
    "AblationResult",
    "Source",
    "Split",
    "ablate",
    "ablation_summary",
    "fan_out",
    "resolve_source",
    "run_ablation",
    "validation_split",
    "study_config",
    "report_split",
    "remote_task",
]

CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"
_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})(?:/.*)?$")
# Fewest images worth a data shard of their own (below this, task overhead dominates).
_MIN_SHARD_IMAGES = 32


# --------------------------------------------------------------------------- the checkpoint


@dataclass
class Source:
    """A checkpoint to analyse and where it came from.

    Attributes:
        checkpoint: the loaded dict (``model``, ``config``, ...) or a bare state dict.
        ref: what the user gave (a path or a run id), for messages and tags.
        path: the local file read.
        run_id: the MLflow run the checkpoint belongs to, when known.
        parent_run_id: that run's parent (the study), when it has one.
        name: short name for output folders (the run id, else the file's name).
        fingerprint: sha256 of the file (keys resumable parts to these exact weights).
        run_store: the tracking URI the run id was found in (None for a path).
    """

    checkpoint: dict
    ref: str
    path: Path
    run_id: str | None
    parent_run_id: str | None
    name: str
    fingerprint: str
    run_store: str | None = None

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.checkpoint.get("model", self.checkpoint)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{self.ref}: its 'model' entry is a {type(sd).__name__}, not a state dict")
        return sd

    @property
    def config(self) -> dict | None:
        """The training run's ``StudyConfig.dump()``, or None for a bare state dict."""
        cfg = self.checkpoint.get("config")
        return cfg if isinstance(cfg, dict) and cfg else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tracking_only(config_path: str | Path | None, overrides: Sequence[str] | None) -> StudyConfig:
    """Defaults plus the file's and ``--set``'s tracking section: enough to find a run before the checkpoint."""
    raw = read_yaml(config_path) if config_path is not None else {}
    tracking = [o for o in overrides or [] if o.strip().startswith("tracking.")]
    return validate(apply_overrides({"tracking": raw.get("tracking", {})}, tracking))


def _mlflow_run(cfg: StudyConfig, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client(cfg).get_run(run_id)
    except MlflowException:
        raise CheckpointError(
            f"there is no MLflow run {run_id} at {cfg.tracking.mlflow_uri}; pass a checkpoint.pt path, or set "
            "tracking.mlflow_uri to the store that holds the run"
        ) from None


def _download_checkpoint(cfg: StudyConfig, run, dst: Path) -> Path:
    """The run's ``checkpoint/checkpoint.pt`` artifact, downloaded to ``dst``."""
    run_id = run.info.run_id
    c = client(cfg)
    names = [a.path for a in c.list_artifacts(run_id, "checkpoint")]
    if CHECKPOINT_ARTIFACT not in names:
        uri = run.data.tags.get("checkpoint_uri")
        if uri and "://" not in uri and (Path(uri) / "checkpoint.pt").is_file():
            return Path(uri) / "checkpoint.pt"
        where = f"; its checkpoint is at {uri}: copy checkpoint.pt from there and pass its path" if uri else ""
        raise CheckpointError(f"MLflow run {run_id} has no {CHECKPOINT_ARTIFACT} artifact{where}")
    return Path(c.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dst)))


def _run_for_file(cfg: StudyConfig, path: Path) -> str | None:
    """The MLflow trial run whose ``checkpoint_uri`` tag is this file's folder, if the tracking store has one."""
    folder = str(path.resolve().parent)
    if "'" in folder:
        return None
    c = client(cfg)
    experiments = [e.experiment_id for e in c.search_experiments()]
    if not experiments:
        return None
    runs = c.search_runs(experiments, filter_string=f"tags.checkpoint_uri = '{folder}'", max_results=1)
    return runs[0].info.run_id if runs else None


def link_source_run(source: Source, cfg: StudyConfig) -> None:
    """For a checkpoint given by path: find the trial run that saved it in ``cfg``'s store, to link to it."""
    run_id = _run_for_file(cfg, source.path)
    if run_id:
        source.run_id = run_id
        source.parent_run_id = client(cfg).get_run(run_id).data.tags.get(PARENT_TAG)
        source.name = run_id[:12]


def resolve_source(
    ref: str | Path,
    *,
    config_path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    workdir: Path,
) -> Source:
    """Load the checkpoint ``ref`` names: a ``checkpoint.pt`` (or a folder holding one) or an MLflow run id.

    A run's artifact is downloaded into ``workdir``; the run is looked up in the
    tracking store of ``--config``/``--set`` (default ``sqlite:///mlflow.db``).
    For a path, :func:`link_source_run` later finds the run that saved it.
    """
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        path = path / "checkpoint.pt"
    run = None
    if not path.exists() and (m := _RUN_ID.match(text)):
        tracking = _tracking_only(config_path, overrides)
        run = _mlflow_run(tracking, m.group(1))
        path = _download_checkpoint(tracking, run, workdir)
    elif not path.exists():
        raise CheckpointError(f"no checkpoint file at {path} (and '{text}' is not an MLflow run id)")
    checkpoint = load_checkpoint(path)
    run_id = run.info.run_id if run is not None else None
    parent = run.data.tags.get(PARENT_TAG) if run is not None else None
    store = tracking.tracking.mlflow_uri if run is not None else None
    if run_id:
        name = run_id[:12]
    elif path.stem == "checkpoint" and path.parent.parent.name:
        name = f"{path.parent.parent.name}-{path.parent.name}"  # <storage>/train-<trial>/checkpoint_<time>/
    else:
        name = path.stem
    return Source(checkpoint, text, path, run_id, parent, name, _sha256(path), store)


def study_config(
    source: Source,
    config_path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    tracking_uri: str | None = None,
) -> StudyConfig:
    """The config to analyse ``source`` with.

    ``data`` and ``model`` come from the checkpoint's config (what it was
    trained on); the other sections from ``config_path`` if given, else from
    the checkpoint's config; ``overrides`` (``--set``) apply last. A bare state
    dict (no config) takes everything from ``config_path``/defaults.
    ``tracking_uri`` pins the store (where a run id was found).
    """
    own = source.config
    raw = read_yaml(config_path) if config_path is not None else copy.deepcopy(own or {})
    if own is not None:
        for section in ("data", "model"):
            if section in own:
                raw[section] = copy.deepcopy(own[section])
        if "data" in own and "val_fraction" not in own["data"]:
            raw["data"]["val_fraction"] = 0.0  # trained before validation splits existed: on every train image
    if tracking_uri is not None:
        raw.setdefault("tracking", {})["mlflow_uri"] = tracking_uri
    return validate(apply_overrides(raw, list(overrides or [])))


def expected_architecture(cfg: StudyConfig) -> dict[str, Any]:
    """What the weights must be (checked by :func:`analysis.ablation.model_from_state_dict`)."""
    return {"variant": cfg.model.variant, "batch_norm": cfg.model.batch_norm, "num_classes": cfg.num_classes}


def check_model(source: Source, cfg: StudyConfig) -> torch.nn.Sequential:
    """The checkpoint's model on the CPU, checked against ``cfg`` (architecture, width, class count)."""
    from trainables.models import _scaled

    model = model_from_state_dict(source.state_dict, device="cpu", **expected_architecture(cfg))
    have, want = model.conv1_1.out_channels, _scaled(64, cfg.model.width)
    if have != want:
        raise CheckpointError(
            f"the checkpoint is a VGG-16 of width {have / 64:g} ({have} conv1_1 channels), but model.width = "
            f"{cfg.model.width:g} ({want}) was expected (a checkpoint of another model?)"
        )
    return model


# --------------------------------------------------------------------------- data


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

    ``data`` comes from the checkpoint's own config (:func:`study_config`), so
    these are exactly the images its training loader never saw.
    """
    from trainables.data import split_of

    if cfg.data.val_fraction == 0:
        raise ConfigError(
            "selecting units needs validation images the model was not trained on, but data.val_fraction = 0 "
            "(the checkpoint was trained on the whole training split); train with data.val_fraction > 0"
        )
    _, val = split_of(cfg.dump()["data"], split_labels(cfg, train=True))
    return Split("val", True, val)


def _split_arrays(cfg: StudyConfig, split: Split) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(uint8 images, labels) of the whole split for in-memory datasets; (None, None) for streamed ones."""
    from trainables.datasets import dataset_spec

    spec = dataset_spec(cfg.data.name)
    if not spec.in_memory:
        return None, None
    return spec.arrays(cfg.data, train=split.train)


def _shard_batches(data: dict, images, labels, train: bool, indices: torch.Tensor, batch_size: int, device):
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


def _eval_batch_size(cfg: StudyConfig) -> int:
    return 256 if cfg.model.variant == "cifar" else 64


# --------------------------------------------------------------------------- the Ray task


def shard_task(state_dict: dict, images, labels, job: dict) -> dict:
    """One (unit chunk, data shard) of an ablation or one data shard of interventions.

    ``state_dict``, ``images`` and ``labels`` arrive resolved (top-level ObjectRefs,
    put once by the driver). ``job``: kind ("ablation" | "intervention"),
    data (the data config dump), train, indices (positions in ``images``; dataset
    indices for places365), batch_size, num_classes,
    expected (architecture), layer, units or interventions, fail_marker.
    Returns the counts' ``state_dict()`` (plain CPU tensors).
    """
    from analysis.ablation import ablate_units, precision_differences
    from analysis.intervention import Intervention, intervention_counts

    marker = job.get("fail_marker")
    if marker and not Path(marker).exists():  # fault injection (tests): fail the first attempt only
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text("failed once")
        raise RuntimeError(f"injected fault in {Path(marker).name} (first attempt)")
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    model = model_from_state_dict(state_dict, device=device, **job["expected"])
    dtype = torch.float64 if job["dtype"] == "float64" else torch.float32

    def batches_of(indices):
        return _shard_batches(job["data"], images, labels, job["train"], indices, job["batch_size"], device)

    if job["kind"] == "ablation":
        counts = ablate_units(model, job["layer"], batches_of(job["indices"]), job["units"], device=device,
                              num_classes=job["num_classes"], dtype=dtype)
        state = counts.state_dict()
        check = job["indices"][job["precision_check"]]
        state["precision_pairs"], state["precision_differ"] = (
            precision_differences(model, job["layer"], batches_of(check), job["units"], device=device,
                                  num_classes=job["num_classes"]) if check.numel() else (0, 0))
        return state
    plan = [Intervention(**d) for d in job["interventions"]]
    return intervention_counts(model, job["layer"], batches_of(job["indices"]), plan, device=device,
                               num_classes=job["num_classes"], dtype=dtype).state_dict()


# --------------------------------------------------------------------------- fan-out


@dataclass
class FanOut:
    """What :func:`fan_out` did: the parts' results by key, and which were computed now or reused."""

    results: dict[str, dict]
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    precision: tuple[int, int] = (0, 0)  # ablation: (unit, image) pairs re-checked in float64, and how many differ


def _job_hash(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, default=lambda t: t.tolist() if torch.is_tensor(t) else str(t))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _plan(parts_dir: Path | None, identity: dict, make: Callable[[], dict]) -> dict:
    """The job's grid: read back from ``plan.json`` when resuming, else made now and saved."""
    if parts_dir is None:
        return make()
    file = parts_dir / "plan.json"
    if file.is_file():
        saved = json.loads(file.read_text())
        if saved.get("identity_hash") == _job_hash(identity):
            return saved["grid"]
    grid = make()
    parts_dir.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"identity_hash": _job_hash(identity), "grid": grid}, indent=1))
    return grid


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


def fan_out(
    cfg: StudyConfig,
    jobs: dict[str, tuple[dict, Any, Any]],
    state_ref,
    *,
    parts_dir: Path | None,
    desc: str,
    quiet: bool = False,
) -> FanOut:
    """Run :func:`shard_task` for every job not already saved in ``parts_dir``; save each result as it lands.

    ``jobs``: key -> (job dict, images ref, labels ref). ``state_ref`` is the
    state dict's ObjectRef, passed top-level so tasks receive it resolved.
    """
    out = FanOut({})
    todo = {}
    for key, spec in jobs.items():
        part = parts_dir / f"{key}.pt" if parts_dir is not None else None
        if part is not None and part.is_file():
            out.results[key] = load_checkpoint(part)
            out.reused.append(key)
        else:
            todo[key] = spec
    if not todo:
        return out
    task = remote_task(shard_task, task_resources(cfg)[0], cfg.ablation.max_retries)
    pending = {task.remote(state_ref, images, labels, job): key for key, (job, images, labels) in todo.items()}
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


def _chunks(units: list[int], size: int) -> list[list[int]]:
    return [units[i : i + size] for i in range(0, len(units), size)]


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    return [(i * n // shards, (i + 1) * n // shards) for i in range(shards)]


def default_shards(n_images: int, n_chunks: int, slots: int) -> int:
    """Data shards: fill the cluster's slots (divided among unit chunks), >= 32 images each."""
    return max(1, min(math.ceil(slots / n_chunks), n_images // _MIN_SHARD_IMAGES))


def _common_job(cfg: StudyConfig, split: Split) -> dict:
    return {
        "data": cfg.dump()["data"],
        "train": split.train,
        "batch_size": _eval_batch_size(cfg),
        "num_classes": cfg.num_classes,
        "expected": expected_architecture(cfg),
        "layer": cfg.ablation.layer,
        "dtype": cfg.ablation.dtype,
    }


@dataclass
class Shared:
    """ObjectRefs put once per command: the state dict and each split's (images, labels).

    In-memory datasets put only the split's own images (``images[split.indices]``),
    so tasks address them by position; places365 tasks read files by dataset index.
    """

    state: Any
    arrays: dict[str, tuple[Any, Any]]
    in_memory: bool

    def indices(self, split: Split, lo: int, hi: int) -> torch.Tensor:
        """What a task over positions ``lo:hi`` of ``split`` indexes its images with."""
        return torch.arange(lo, hi) if self.in_memory else split.indices[lo:hi]


def put_shared(cfg: StudyConfig, source: Source, splits: Sequence[Split]) -> Shared:
    arrays = {}
    for split in splits:
        images, labels = _split_arrays(cfg, split)
        if images is not None:
            images, labels = images[split.indices], labels[split.indices]
        arrays[split.name] = (ray.put(images), ray.put(labels))
    from trainables.datasets import dataset_spec

    return Shared(ray.put(dict(source.state_dict)), arrays, dataset_spec(cfg.data.name).in_memory)


def ablation_counts(
    cfg: StudyConfig,
    source: Source,
    split: Split,
    units: list[int],
    shared: Shared,
    *,
    out_dir: Path | None,
    num_shards: int | None = None,
    quiet: bool = False,
    fail_once_dir: Path | None = None,
) -> tuple[AblationCounts, FanOut]:
    """Per-unit ablation counts of ``split``, fanned out over unit chunks x data shards and merged."""
    identity = {"kind": "ablation", "version": 2, "checkpoint": source.fingerprint, "split": split.name,
                "indices": _job_hash({"i": split.indices}), "layer": cfg.ablation.layer, "units": units,
                "data": cfg.dump()["data"], "dtype": cfg.ablation.dtype,
                "precision_sample": cfg.ablation.precision_sample}
    parts_dir = out_dir / "parts" / f"ablation-{split.name}-{_job_hash(identity)}" if out_dir else None

    def make() -> dict:
        chunks = _chunks(units, cfg.ablation.unit_chunk)
        shards = num_shards or default_shards(split.num_images, len(chunks), task_resources(cfg)[1])
        return {"chunks": chunks, "shards": shard_bounds(split.num_images, shards)}

    grid = _plan(parts_dir, identity, make)
    common = _common_job(cfg, split)
    images, labels = shared.arrays[split.name]
    sample = precision_sample(cfg, split.num_images)
    jobs = {}
    for c, chunk in enumerate(grid["chunks"]):
        for s, (lo, hi) in enumerate(grid["shards"]):
            key = f"chunk{c:03d}-shard{s:03d}"
            marker = str(fail_once_dir / f"{parts_dir.name if parts_dir else split.name}-{key}") if fail_once_dir else None
            check = sample[(sample >= lo) & (sample < hi)] - lo  # positions within the shard
            jobs[key] = ({**common, "kind": "ablation", "units": chunk, "indices": shared.indices(split, lo, hi),
                          "precision_check": check, "fail_marker": marker}, images, labels)
    done = fan_out(cfg, jobs, shared.state, parts_dir=parts_dir, desc=f"ablating {cfg.ablation.layer} ({split.name})",
                   quiet=quiet)
    counts = AblationCounts.merge(AblationCounts.from_state_dict(done.results[k]) for k in jobs)
    done.precision = (sum(int(done.results[k]["precision_pairs"]) for k in jobs),
                      sum(int(done.results[k]["precision_differ"]) for k in jobs))
    return counts, done


def precision_sample(cfg: StudyConfig, num_images: int) -> torch.Tensor:
    """Sorted positions of the images re-checked in float64 (``ablation.precision_sample``; none in float64)."""
    if cfg.ablation.dtype == "float64" or cfg.ablation.precision_sample == 0:
        return torch.zeros(0, dtype=torch.long)
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(cfg.data.seed))
    return perm[: cfg.ablation.precision_sample].sort().values


# --------------------------------------------------------------------------- outputs


def class_names(cfg: StudyConfig) -> list[str] | None:
    from trainables.datasets import dataset_spec

    return dataset_spec(cfg.data.name).class_names()


def _figures(counts: AblationCounts, out_dir: Path) -> list[Path]:
    """Per-unit overall accuracy change, sorted; and the units x classes heatmap of change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = rank_units(counts)
    change = ranked["change"].to_numpy() * 100
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sig = ranked["significant"].to_numpy()
    colours = ["lightgray" if not q else "tab:red" if c > 0 else "tab:blue" for c, q in zip(change, sig)]
    ax.bar(range(len(change)), change, width=1.0, color=colours)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"{counts.layer} units, sorted by change (most important left)\ncoloured: significant "
                  f"(exact McNemar, BH q < {ALPHA:g}; {int(sig.sum())} of {len(sig)} units), grey: not")
    ax.set_ylabel("accuracy change (points)")
    ax.set_title(f"Removing one {counts.layer} unit: accuracy change vs baseline "
                 f"{float(counts.baseline_correct.sum()) / counts.num_images:.2%} ({counts.num_images} images)")
    fig.tight_layout()
    bars = out_dir / "unit_change.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)

    order = torch.as_tensor([int((counts.units == u).nonzero()) for u in ranked["unit"]])
    delta = (counts.accuracy - counts.baseline_accuracy)[order].nan_to_num(0).numpy() * 100
    lim = max(abs(delta).max(), 1e-9)
    fig, ax = plt.subplots(figsize=(max(5, min(16, 0.05 * delta.shape[1] + 4)), 6))
    im = ax.imshow(delta, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xlabel("class")
    ax.set_ylabel("unit (sorted as in unit_change.png)")
    if len(ranked) <= 64:
        ax.set_yticks(range(len(ranked)), [str(u) for u in ranked["unit"]], fontsize=5)
    ax.set_title(f"{counts.layer}: per-class accuracy change\nwhen one unit is removed (points)")
    fig.colorbar(im, ax=ax, label="change (points); red: removal helps the class")
    fig.tight_layout()
    heat = out_dir / "heatmap.png"
    fig.savefig(heat, dpi=120)
    plt.close(fig)
    return [bars, heat]


def write_ablation_outputs(counts: AblationCounts, cfg: StudyConfig, out_dir: Path) -> list[Path]:
    """ablation.parquet / .csv (tidy), units_ranked.csv, units_ranked_per_class.csv, two PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = class_names(cfg)
    tidy = class_accuracy(counts, names)
    files = [out_dir / "ablation.parquet", out_dir / "ablation.csv", out_dir / "units_ranked.csv",
             out_dir / "units_ranked_per_class.csv"]
    tidy.to_parquet(files[0], index=False)
    tidy.to_csv(files[1], index=False)
    rank_units(counts).to_csv(files[2], index=False)
    rank_units_per_class(counts, cfg.ablation.top_k, names).to_csv(files[3], index=False)
    return files + _figures(counts, out_dir)


def log_run(
    cfg: StudyConfig,
    source: Source,
    *,
    kind: str,
    name: str,
    metrics: dict[str, float],
    params: dict[str, Any],
    files: Sequence[Path],
    tags: dict[str, str] | None = None,
) -> str:
    """One finished MLflow run with ``files`` as artifacts, linked to the checkpoint's run and its study."""
    from mlflow.entities import Metric, Param, RunTag

    c = client(cfg)
    tags = {"kind": kind, "checkpoint": source.ref, "checkpoint_sha256": source.fingerprint,
            "git_commit": git_commit(), "command": " ".join(sys.argv), **(tags or {})}
    if source.run_id:
        tags["source_run_id"] = source.run_id
    if source.parent_run_id:
        tags[PARENT_TAG] = source.parent_run_id
    run_id = c.create_run(experiment_id(cfg), run_name=name, tags=tags).info.run_id
    flat = {**flatten(cfg.dump()), **params}
    c.log_batch(
        run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)[:6000]) for k, v in flat.items()],
        tags=[RunTag("mlflow.note.content", f"{kind} of checkpoint {source.ref}")],
    )
    for f in files:
        c.log_artifact(run_id, str(f))
    c.set_terminated(run_id, "FINISHED")
    return run_id


# --------------------------------------------------------------------------- study ablate


@dataclass
class AblationResult:
    counts: AblationCounts
    ranked: pd.DataFrame  # rank_units(counts)
    out_dir: Path
    files: list[Path]
    run_id: str
    source: Source
    fan_out: FanOut
    cfg: StudyConfig

    @property
    def baseline_accuracy(self) -> float:
        return float(self.ranked["baseline_accuracy"].iloc[0])


def ablate(
    cfg: StudyConfig,
    source: Source,
    *,
    out_dir: Path,
    num_shards: int | None = None,
    quiet: bool = False,
    fail_once_dir: Path | None = None,
) -> AblationResult:
    """Ablate every unit (or ``ablation.units``) of ``ablation.layer`` on the test split; write and log the results.

    ``fail_once_dir`` (tests): every task fails on its first attempt, leaving a
    marker file there, so Ray's retries must finish the job.
    """
    model = check_model(source, cfg)
    units = check_units(model, cfg.ablation.layer, cfg.ablation.units).tolist()
    split = report_split(cfg)
    init_ray(cfg)
    shared = put_shared(cfg, source, [split])
    counts, done = ablation_counts(cfg, source, split, units, shared, out_dir=out_dir, num_shards=num_shards,
                                   quiet=quiet, fail_once_dir=fail_once_dir)
    files = write_ablation_outputs(counts, cfg, out_dir)
    ranked = rank_units(counts)
    baseline = float(counts.baseline_correct.sum()) / counts.num_images
    pairs, differ = done.precision
    metrics = {"test/baseline_acc": baseline, "test/best_unit_change": float(ranked["change"].min()),
               "test/worst_unit_change": float(ranked["change"].max()),
               "test/significant_units": int(ranked["significant"].sum())}
    if pairs:
        metrics.update({"precision/pairs_checked": pairs, "precision/pairs_differ": differ})
    run_id = log_run(
        cfg, source, kind="ablation", name=f"ablation-{cfg.ablation.layer}-{source.name}",
        metrics=metrics,
        params={"ablation.num_units": len(units), "ablation.num_images": counts.num_images,
                "ablation.tasks": len(done.results)},
        files=files,
    )
    return AblationResult(counts, ranked, out_dir, files, run_id, source, done, cfg)


def _units_option(units: str | None) -> list[int] | None:
    if units is None:
        return None
    try:
        return [int(u) for u in units.split(",") if u.strip()]
    except ValueError:
        raise ConfigError(f"--units expects comma-separated unit indices such as 0,5,9, got '{units}'") from None


def prepare(
    checkpoint: str,
    config_path: str | Path | None,
    overrides: Sequence[str] | None,
    *,
    layer: str | None,
    units: str | None,
    workdir: Path,
    extra: Sequence[str] = (),
) -> tuple[StudyConfig, Source]:
    """Resolve the checkpoint and the config for a CLI command (everything checked before Ray starts)."""
    sets = list(overrides or [])
    if layer is not None:
        sets.append(f"ablation.layer={layer}")
    parsed = _units_option(units)
    if parsed is not None:
        sets.append(f"ablation.units={json.dumps(parsed)}")
    sets += list(extra)
    source = resolve_source(checkpoint, config_path=config_path, overrides=sets, workdir=workdir)
    cfg = with_absolute_paths(study_config(source, config_path, sets, tracking_uri=source.run_store))
    if source.run_id is None:
        link_source_run(source, cfg)
    return cfg, source


def run_ablation(
    checkpoint: str,
    config_path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    units: str | None = None,
    out: Path | None = None,
    num_shards: int | None = None,
    quiet: bool = False,
) -> AblationResult:
    """``study ablate``: resolve, check, fan out, write, log."""
    with tempfile.TemporaryDirectory(prefix="unitstudy-ckpt-") as tmp:
        cfg, source = prepare(checkpoint, config_path, overrides, layer=layer, units=units, workdir=Path(tmp))
        out_dir = Path(out) if out is not None else Path("outputs") / f"ablation-{source.name}"
        return ablate(cfg, source, out_dir=out_dir, num_shards=num_shards, quiet=quiet)


def ablation_summary(result: AblationResult, n: int = 5) -> list[str]:
    """A few lines for the terminal: baseline, the n worst and n best units, where things went."""
    c = result.counts
    r = result.ranked
    worst = r.sort_values(["change", "unit"], ascending=[False, True]).head(n)
    best = r.head(n)
    src = f", source run {result.source.run_id}" if result.source.run_id else ""
    raised, lowered = r[r["significant"] & (r["change"] > 0)], r[r["significant"] & (r["change"] < 0)]
    lines = [
        f"{c.layer}: {c.units.numel()} units ablated one at a time on {c.num_images} test images, "
        f"{len(result.fan_out.results)} tasks ({len(result.fan_out.computed)} run now, "
        f"{len(result.fan_out.reused)} resumed)",
        f"baseline accuracy {result.baseline_accuracy:.2%}; each change is tested against it on the same images "
        f"(exact McNemar test, Benjamini-Hochberg q over the {len(r)} units)",
        f"significant at q < {ALPHA:g}: {len(lowered)} unit(s) whose removal lowers accuracy, {len(raised)} whose "
        "removal raises it",
        f"worst units (removal raises accuracy): {_unit_list(worst)}",
        f"best units (removal lowers accuracy):  {_unit_list(best)}",
    ]
    pairs, differ = result.fan_out.precision
    if pairs:
        lines.append(f"float32 check: {differ} of {pairs} (unit, image) results differ from float64 on a sample "
                     f"of images" + ("" if not differ else "; use --set ablation.dtype=float64 for exact counts"))
    return lines + [
        f"outputs: {result.out_dir}/ ({', '.join(f.name for f in result.files)})",
        f"MLflow run {result.run_id} (kind=ablation{src})",
    ]


def _unit_list(rows: pd.DataFrame) -> str:
    """``48 (+1.20 pt, q 0.030*)``: change, q-value, ``*`` when significant."""
    return ", ".join(f"{int(r.unit)} ({r.change * 100:+.2f} pt, q {r.q_value:.3f}{'*' if r.significant else ''})"
                     for r in rows.itertuples())
