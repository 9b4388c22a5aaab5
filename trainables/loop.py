"""The per-worker training loop that Ray Train runs on every DDP rank.

``train_fn_per_worker(config)`` rebuilds the typed :class:`trainables.config.WorkerConfig`
once from the driver's validated ``StudyConfig.dump()`` in ``config["config"]``
and does, per epoch: one pass over this rank's shard with
the configured regularizers, one evaluation of the whole validation and test
sets (each rank a disjoint block; counts all-reduced; with ``train.test_images_per_epoch``
only the first N test images, except at the last epoch and at the epochs in
``config["full_test_epochs"]``, where a scheduler may stop the trial: a trial's last
checkpoint always carries a whole-test-split accuracy), then ``ray.train.report(metrics,
checkpoint)`` on every rank (rank 0 attaches the checkpoint).

Resuming: ``ray.train.get_checkpoint()`` restores model, optimizer, scheduler,
epoch and the metric history. The checkpoint is the record: each one carries
the metrics of every epoch up to it (``history``, also as ``history.json``
beside ``checkpoint.pt``, small enough for the driver to read), so the driver
can log an epoch whose result a kill kept from it (:class:`study.tracking.TrialLogger`).
Every random stream is reseeded at the start of each epoch:
torch's global generator (dropout) from ``(train.seed, epoch, rank)``, the
FocusedDropout generator from ``(train.seed, epoch)`` alone so that all ranks
agree on which global mini-batches participate (the loader's permutation and
augmentation are already functions of (seed, epoch, rank)), so a run resumed at an epoch boundary
continues exactly as the uninterrupted run would. The checkpoint records that
scheme and the epoch, which together are the RNG state.

Metric keys (DESIGN.md): ``train/loss``, ``train/acc``, ``train/penalty``,
``val/loss``, ``val/acc`` (when ``data.val_fraction`` > 0), ``test/loss``,
``test/acc``, ``time/epoch_s``, ``lr``, ``epoch``, and what the epoch cost
(:mod:`trainables.resources`): ``system/images_per_s``, ``system/peak_rss_mb``,
on CUDA ``system/peak_gpu_memory_mb`` and, with NVML, ``system/gpu_utilization_pct``.
Choices (Tune's objective, ASHA, the best trial) read ``val/*``; ``test/*`` is
reported only.

The only Ray this module touches is ``ray.train``.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainables.checkpoint import checkpoint_dict, load_checkpoint, save_checkpoint
from trainables.config import RegularizationConfig, TrainConfig, WorkerConfig
from trainables.data import build_loaders
from trainables.focused_dropout import FocusedDropout
from trainables.models import load_vgg16_state_dict
from trainables.regularizers import batch_loss, build_model
from trainables.resources import EpochResources, reduce_over_ranks

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"  # beside the checkpoint: every epoch's metrics up to it
# A test hook: "<point>:<step>:<dir>" stops the run the first time it reaches ``point`` of epoch ``step``
# (from 1): it writes <dir>/stopped-<point>-<step> and waits there to be killed (tests/test_kill_points.py).
STOP_ENV = "UNITSTUDY_TEST_STOP"
RNG_SCHEME = "per epoch: torch.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank); FocusedDropout with rank 0"


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return seed * 1_000_003 + epoch * 1_009 + rank


def stop_point(spec: str | None, point: str, step: int) -> None:
    """The :data:`STOP_ENV` hook: wait here (to be killed) the first time ``point`` of epoch ``step`` is reached.

    Points: ``report`` (a worker has the epoch's metrics, its checkpoint is not
    yet persisted), ``logging`` (the driver has the result, the checkpoint is
    persisted, MLflow has not the metrics), ``logged`` (MLflow has them, Tune's
    state is not yet saved), ``analysis`` (an analysis run is created, its
    artifacts not yet logged; step 0). Fires once per directory: a resumed run
    passes through.
    """
    if not spec:
        return
    want, at, where = spec.split(":", 2)
    if want != point or int(at) != step:
        return
    marker = Path(where) / f"stopped-{point}-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    time.sleep(600)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp``: auto = bf16 on CUDA, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def compile_model(model: nn.Module, mode: str, device: torch.device, reg: RegularizationConfig) -> bool:
    """Apply ``train.compile`` to ``model`` in place (``nn.Module.compile``); whether it was compiled.

    auto = on for CUDA only, and off while the exact (double_backprop) penalty
    is on: torch.compile's backward cannot itself be differentiated ("does not
    currently support double backward"). In place, the module stays the same
    object, so its ``state_dict`` keys (the checkpoint) and the FocusedDropout
    and DDP references to it are unchanged; the training forward and the
    evaluation forward (``eval()``) each compile once.
    """
    gp = reg.gradient_penalty
    exact = gp.lam > 0 and gp.method == "double_backprop"
    on = mode == "on" or (mode == "auto" and device.type == "cuda" and not exact)
    if on:
        model.compile()
    return on


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def _device_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def train_one_epoch(model, loader, optimizer, reg_cfg, autocast_dtype, scaler, device, first_step: int = 0
                    ) -> torch.Tensor:
    """One pass over ``loader``; returns summed (loss, correct, images, penalty x images, penalised images).

    ``first_step`` numbers this epoch's first optimizer step (``epoch * len(loader)``),
    which decides the lazy penalty's steps identically on every rank.
    """
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x images, correct, penalty x images
    images = penalised = 0  # host counts: no device sync per step
    for i, (x, y) in enumerate(loader):
        # fp16: the inner gradient of the penalty is loss-scaled like the outer one (a tensor: no sync)
        grad_scale = scaler.scale(torch.ones((), device=device)) if scaler is not None else None
        with _autocast(device, autocast_dtype):
            loss, logits, logs = batch_loss(model, _device_batch(x, device), y, reg_cfg, step=first_step + i,
                                            grad_scale=grad_scale)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = y.shape[0]
        sums[0] += loss.detach().double() * n
        sums[1] += (logits.detach().argmax(1) == y).sum()
        if "penalty" in logs:
            sums[2] += logs["penalty"].double() * n
            penalised += n
        images += n
    counts = torch.tensor([images, penalised], dtype=torch.float64, device=device)  # one copy per epoch
    return torch.cat([sums[:2], counts[:1], sums[2:], counts[1:]])


@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast_dtype, device) -> torch.Tensor:
    """Summed (cross-entropy, correct, images) of this rank's block of an evaluation set."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    images = 0
    for x, y in loader:
        with _autocast(device, autocast_dtype):
            logits = model(_device_batch(x, device))
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum()
        images += y.shape[0]
    return torch.cat([sums, torch.tensor([float(images)], dtype=torch.float64, device=device)])


def _maybe_inject_fault(train_cfg: TrainConfig, epoch: int, rank: int, world_size: int, resumed: bool) -> None:
    """Test hook: with ``train.fail_at_epoch = k`` the last rank kills itself at epoch k, once.

    "Once" = only in an attempt that did not start from a checkpoint, so the
    restarted worker group (which resumes from one) runs through.

    Before dying it waits two of Ray Train's health-check intervals: on Ray 2.60
    the controller collects reports when it polls the workers, and a worker that
    dies within one poll interval of its last ``report`` takes that report (and
    its checkpoint) with it, so the restart would begin from scratch.
    """
    if train_cfg.fail_at_epoch == epoch and rank == world_size - 1 and not resumed:
        time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 0.5)
        os.kill(os.getpid(), signal.SIGKILL)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``config = {"config": StudyConfig.dump(), "num_classes": int}``, optionally
    ``"full_test_epochs"``: epochs (from 1) tested on the whole test split besides the last."""
    import ray.train
    import ray.train.torch

    dump = config["config"]
    cfg = WorkerConfig.from_dump(dump, config["num_classes"])  # validated on the driver; rebuilt once here
    tcfg = cfg.train
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    if device.type == "cpu":  # the worker reserved train.cpus_per_worker CPUs: use them, no more
        torch.set_num_threads(tcfg.cpus_per_worker)
    autocast_dtype = amp_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    if tcfg.sync_batchnorm and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    per_rank_batch = max(1, tcfg.batch_size // world_size)
    train_loader, val_loader, test_loader = build_loaders(
        cfg.data, batch_size=per_rank_batch, device=device, rank=rank, world_size=world_size, seed=tcfg.seed
    )
    n_test = tcfg.test_images_per_epoch
    full_test_at = {int(e) for e in config.get("full_test_epochs") or ()}
    test_each_epoch = test_loader if n_test is None or n_test >= test_loader.num_images else test_loader.head(n_test)
    optimizer = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tcfg.t_max)

    start_epoch, resumed, history = 0, False, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)
        load_vgg16_state_dict(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, resumed = state["epoch"] + 1, True
        history = [h for h in state.get("history") or [] if h["epoch"] <= state["epoch"]]
    model = ray.train.torch.prepare_model(model)  # DDP when world_size > 1 (gloo on CPU, nccl on GPU)
    compile_model(model, tcfg.compile, device, cfg.regularization)  # after DDP wraps it, as PyTorch advises
    focused = [m for m in model.modules() if isinstance(m, FocusedDropout)]

    for epoch in range(start_epoch, tcfg.epochs):
        torch.manual_seed(_epoch_seed(tcfg.seed, epoch, rank))
        for m in focused:  # same stream on every rank: a global mini-batch participates as a whole
            m.generator.manual_seed(_epoch_seed(tcfg.seed, epoch, 0))
        train_loader.set_epoch(epoch)
        _maybe_inject_fault(tcfg, epoch, rank, world_size, resumed)

        t0 = time.perf_counter()
        with EpochResources(device) as cost:
            train_sums = _all_reduce(train_one_epoch(model, train_loader, optimizer, cfg.regularization,
                                                     autocast_dtype, scaler, device, epoch * len(train_loader)))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_s = time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            # the whole test split at the last epoch and where a scheduler may stop the trial; else the head
            whole = epoch == tcfg.epochs - 1 or epoch + 1 in full_test_at
            evals = {"test": test_loader if whole else test_each_epoch}
            if val_loader is not None:
                evals = {"val": val_loader, **evals}
            eval_sums = {split: _all_reduce(evaluate(model, loader, autocast_dtype, device))
                         for split, loader in evals.items()}
            epoch_s = time.perf_counter() - t0
        t_loss, t_correct, t_n, t_pen, t_pen_n = train_sums.tolist()
        metrics = {
            "epoch": epoch,
            "train/loss": t_loss / max(t_n, 1),
            "train/acc": t_correct / max(t_n, 1),
            "train/penalty": t_pen / max(t_pen_n, 1),  # over the steps that computed it
            "time/epoch_s": epoch_s,
            "system/images_per_s": t_n / max(train_s, 1e-9),
            "lr": lr,
            **reduce_over_ranks(cost.metrics(), device, world_size),
        }
        for split, sums in eval_sums.items():
            e_loss, e_correct, e_n = sums.tolist()
            metrics.update({f"{split}/loss": e_loss / max(e_n, 1), f"{split}/acc": e_correct / max(e_n, 1),
                            f"{split}/images": e_n})
        metrics["test/split_images"] = test_loader.num_images  # test/images when the whole split was tested
        history.append(metrics)
        stop_point(config.get("test_stop"), "report", epoch + 1)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = checkpoint_dict(model, optimizer, scheduler, epoch, dump, rng_scheme=RNG_SCHEME,
                                        history=history)
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, state)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
