"""What an epoch cost a worker: throughput, peak memory and (on a GPU) utilization.

Reported by :func:`trainables.loop.train_fn_per_worker` with every epoch's
metrics, so MLflow charts trials' cost beside their accuracy (step = epoch).
The keys start with ``system/``: MLflow shows them in its "System metrics"
tab and chart section.

* ``system/images_per_s``: training images per second of the epoch's training
  pass (all ranks' images over rank 0's wall time; evaluation not included);
* ``system/peak_rss_mb``: the largest resident set of any rank's process since
  it started (``getrusage``'s ``ru_maxrss``), on CPU and GPU alike: host memory,
  a high-water mark that never goes down;
* ``system/peak_gpu_memory_mb`` (CUDA only): the most tensor memory PyTorch
  held on any rank's GPU during this epoch (``torch.cuda.max_memory_allocated``,
  reset at the start of each epoch); absent on CPU;
* ``system/gpu_utilization_pct`` (CUDA with NVML only): the mean of
  ``torch.cuda.utilization`` sampled every :data:`SAMPLE_S` seconds during the
  epoch, averaged over ranks; absent on CPU and where NVML's Python binding
  (``pynvml``, package nvidia-ml-py) is not installed.
"""

from __future__ import annotations

import resource
import sys
import threading

import torch

SAMPLE_S = 0.5  # seconds between GPU utilization samples


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def gpu_utilization(device: torch.device) -> float | None:
    """The GPU's utilization in percent now (NVML), or None without CUDA or without NVML's binding."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # no binding, or NVML refuses (a MIG slice, a container without access): not measured
        return None


class EpochResources:
    """Measure one epoch on one rank: ``with EpochResources(device) as r: ...``, then :meth:`metrics`.

    On CUDA it resets the peak-memory counter on entry and samples utilization
    from a daemon thread while the block runs (NVML calls do not synchronise the
    device, so the training stream is not slowed).
    """

    def __init__(self, device: torch.device, sample_s: float = SAMPLE_S):
        self.device, self.sample_s = device, sample_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EpochResources:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            if gpu_utilization(self.device) is not None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            value = gpu_utilization(self.device)
            if value is not None:
                self.samples.append(value)
            if self._stop.wait(self.sample_s):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def metrics(self) -> dict[str, float]:
        """This rank's values (MiB, percent); only those this device can measure."""
        out = {"system/peak_rss_mb": peak_rss_mb()}
        if self.device.type == "cuda":
            out["system/peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            if self.samples:
                out["system/gpu_utilization_pct"] = sum(self.samples) / len(self.samples)
        return out


def reduce_over_ranks(values: dict[str, float], device: torch.device, world_size: int) -> dict[str, float]:
    """Every rank's :meth:`EpochResources.metrics` as one set: memory the largest rank's, utilization the mean.

    A collective: every rank calls it with the same keys (the same device type, which DDP ensures).
    """
    import torch.distributed as dist

    keys = sorted(values)
    peak = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    total = peak.clone()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    peak, total = peak.tolist(), total.tolist()
    return {k: total[i] / world_size if k == "system/gpu_utilization_pct" else peak[i] for i, k in enumerate(keys)}
