"""GPU speed: training images/s, the penalty's and the ablation's ratios, and the paper's 150 epochs projected.

Torch, pydantic and the worker-side modules only (like ``gpu_check.py``: no Ray,
MLflow or Optuna), so it runs on a bare CUDA box. VGG-16-BN, CIFAR-100 shape
(32 px, 100 classes, width 1.0), random data of that shape (speed does not
depend on the pixels), one device, measured side by side in one run:

1. training images/s through ``trainables.regularizers.batch_loss`` + SGD, in
   float32, in bf16 autocast with channels_last (what ``train.amp: auto``
   does), and the same under ``torch.compile`` (``--no-compile`` skips it);
2. the exact and the finite-difference input-gradient penalty's step time over a
   plain step (bf16, channels_last; the finite difference runs its forwards in
   float32 by design);
3. all-unit ablation of conv5_3 (512 units) over one evaluation pass;
4. the paper's 150 epochs of 50,000 CIFAR-100 training images at the fastest
   plain setting, and with the exact penalty at every step (the paper) and at
   every 4th (``gradient_penalty.every: 4``), assuming the measured steady-state
   step rate for the whole run (no data loading cost: the kit's loader keeps
   CIFAR-100 on the device; evaluation passes not counted);
5. packing (``train.gpus_per_worker`` < 1): the aggregate training images/s of
   k = 1, 2, 4 trials sharing the device, each a separate process running the
   kit's own loop (``trainables.loop.train_one_epoch`` over a device-resident
   ``DeviceLoader``, bf16 + channels_last, not compiled), started together
   after warm-up; then the 150-epoch run and the paper's 12-run Table 2 grid
   (4 methods x 3 seeds; the 3 input-gradient runs at the exact penalty's
   measured ratio) projected at the best packing.

Without CUDA it prints one line saying it skipped (``--device cpu`` runs it small
on the CPU, to check the script). The last line is the figure.

    python benchmarks/gpu.py [--batch-size 128] [--steps 20] [--no-compile] [--packing 1,2,4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.ablation import ablate_units  # noqa: E402
from analysis.evaluation import evaluate_class_counts  # noqa: E402
from trainables.config import WorkerConfig  # noqa: E402
from trainables.data import DeviceLoader  # noqa: E402
from trainables.loop import train_one_epoch  # noqa: E402
from trainables.regularizers import batch_loss, build_model  # noqa: E402

EPOCHS, TRAIN_IMAGES = 150, 50_000  # the paper's CIFAR-100 schedule
GRID_RUNS, GRID_PENALTY_RUNS = 12, 3  # Table 2: 4 methods x 3 seeds; the L2 input-gradient method's 3 runs


def config(width: float, lam: float = 0.0, method: str = "double_backprop") -> WorkerConfig:
    return WorkerConfig.from_dump({
        "model": {"variant": "cifar", "batch_norm": True, "width": width, "num_classes": 100},
        "regularization": {"focused_dropout": {"par_rate": 0.0}, "dropout": {"rate": 0.0},
                           "gradient_penalty": {"lambda": lam, "method": method, "h": 0.01, "every": 1}},
        "train": {"seed": 0}})


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(cfg: WorkerConfig, device, batch: int, steps: int, bf16: bool, channels_last: bool,
                 compiled: bool) -> float:
    """Median seconds of one training step (forward, backward, SGD update) after warm-up."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps (compilation, cuDNN autotuning)
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = batch_loss(run, x, y, cfg.regularization)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def packed_trial(device: str, width: float, batch: int, steps: int) -> int:
    """One packed trial (a child process): warm up, say ``ready``, wait for ``go`` on stdin, train ``steps``
    steps with the kit's loop, print JSON ``{start, end, images}`` (``time.monotonic``, shared by processes)."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)
    cfg = config(width)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    images = torch.randint(0, 256, (batch * steps, 3, 32, 32), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.randint(0, 100, (batch * steps,)), batch_size=batch, device=dev)
    warm = DeviceLoader(images[: batch * 3], torch.randint(0, 100, (batch * 3,)), batch_size=batch, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
    dtype = torch.bfloat16 if gpu else None
    train_one_epoch(model, warm, opt, cfg.regularization, dtype, None, dev)  # cuDNN autotuning, allocator
    sync(dev)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    start = time.monotonic()
    sums = train_one_epoch(model, loader, opt, cfg.regularization, dtype, None, dev)
    sync(dev)
    end = time.monotonic()
    print(json.dumps({"start": start, "end": end, "images": int(sums[2].item())}), flush=True)
    return 0


def packed_rate(k: int, device: str, width: float, batch: int, steps: int, timeout_s: float = 300) -> float:
    """Aggregate images/s of ``k`` trials sharing ``device``: every image trained / (last end - first start)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--packed-trial", "--device", device, "--width", str(width),
           "--batch-size", str(batch), "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    try:
        for p in procs:  # all warmed up before any starts: the k loops overlap from the first step
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a packed trial did not start (exit {p.wait(timeout_s)})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.communicate(timeout=timeout_s)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a packed trial failed (exit codes {[p.returncode for p in procs]})")
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return sum(r["images"] for r in results) / span


def ablation_ratio(device, width: float, images: int) -> tuple[float, float, float]:
    """(seconds of one evaluation pass, of the all-unit ablation, their ratio) on random weights, float32."""
    torch.manual_seed(0)
    model = build_model(config(width)).to(device).eval()
    batches = [(torch.randn(256, 3, 32, 32, device=device), torch.randint(0, 100, (256,), device=device))
               for _ in range(max(1, images // 256))]
    best = {}
    for _ in range(3):
        for name, fn in (("eval", lambda: evaluate_class_counts(model, batches, device=device, num_classes=100)),
                         ("ablate", lambda: ablate_units(model, "conv5_3", batches, device=device,
                                                         num_classes=100))):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    return best["eval"], best["ablate"], best["ablate"] / best["eval"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks this script, small)")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=10_240, help="images of the ablation ratio")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile setting")
    ap.add_argument("--packing", default="1,2,4", help="trials sharing the device at once, e.g. 1,2,4")
    ap.add_argument("--packed-steps", type=int, default=60, help="steps each packed trial times")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--packed-trial", action="store_true", help=argparse.SUPPRESS)  # a child of the packing
    args = ap.parse_args()
    if args.packed_trial:
        return packed_trial(args.device, args.width, args.batch_size, args.steps)
    try:
        packing = sorted({int(k) for k in args.packing.split(",")})
    except ValueError:
        packing = []
    if not packing or packing[0] < 1:
        print(f"gpu: --packing takes whole numbers >= 1 separated by commas, not {args.packing!r}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu: skipped, no CUDA device here (run it on a GPU node; --device cpu checks the script)")
        return 0
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if gpu else "the CPU"
    print(f"gpu benchmark on {name}, torch {torch.__version__}, VGG-16-BN width {args.width}, "
          f"batch {args.batch_size}, 32 px, 100 classes")
    b, s = args.batch_size, args.steps
    plain = {"float32": step_seconds(config(args.width), device, b, s, False, False, False),
             "bf16 + channels_last": step_seconds(config(args.width), device, b, s, gpu, gpu, False)}
    if not args.no_compile:
        plain["bf16 + channels_last + torch.compile"] = step_seconds(config(args.width), device, b, s, gpu, gpu, True)
    for setting, sec in plain.items():
        print(f"training, {setting}: {b / sec:,.0f} images/s ({sec * 1000:.1f} ms/step)")
    best_setting = min(plain, key=plain.get)
    base = plain["bf16 + channels_last"]
    ratios = {}
    for method in ("double_backprop", "finite_difference"):
        sec = step_seconds(config(args.width, 0.1, method), device, b, s, gpu, gpu, False)
        ratios[method] = sec / base
        print(f"penalty, {method}: {sec * 1000:.1f} ms/step = {ratios[method]:.2f}x a plain step "
              f"(bf16 + channels_last)")
    t_eval, t_ablate, r_ablate = ablation_ratio(device, args.width, args.images)
    print(f"ablation of 512 conv5_3 units: {t_ablate:.3f} s vs one evaluation pass {t_eval:.3f} s "
          f"= {r_ablate:.2f}x ({max(1, args.images // 256) * 256} images, random weights)")
    epoch_s = TRAIN_IMAGES / (b / plain[best_setting])
    exact = ratios["double_backprop"]
    hours = {"plain": EPOCHS * epoch_s / 3600, "exact penalty": EPOCHS * epoch_s * exact / 3600,
             "exact penalty, every 4": EPOCHS * epoch_s * (exact + 3) / 4 / 3600}
    print(f"the paper's {EPOCHS} epochs of {TRAIN_IMAGES:,} images ({best_setting}): "
          + ", ".join(f"{k} {v:.2f} h" for k, v in hours.items()))
    rates = {k: packed_rate(k, args.device, args.width, b, args.packed_steps) for k in packing}
    for k, rate in rates.items():
        print(f"packing, {k} trial{'s' if k > 1 else ''} sharing the device: {rate:,.0f} images/s in all, "
              f"{rate / k:,.0f} per trial = {rate / rates[packing[0]] * packing[0]:.2f}x {packing[0]} alone "
              f"(separate processes, bf16 + channels_last, not compiled)")
    best_k = max(rates, key=rates.get)
    run_h = EPOCHS * TRAIN_IMAGES / (rates[best_k] / best_k) / 3600
    # the grid's work in plain steps: 9 runs at 1x, 3 at the exact penalty's ratio, at the packing's aggregate rate
    grid_images = EPOCHS * TRAIN_IMAGES * (GRID_RUNS - GRID_PENALTY_RUNS + GRID_PENALTY_RUNS * exact)
    grid_h = grid_images / rates[best_k] / 3600
    waves = math.ceil(GRID_RUNS / best_k)
    beside = "alone" if best_k == 1 else f"{best_k - 1} other{'s' if best_k > 2 else ''} beside it"
    print(f"at the best packing ({best_k} at once): one {EPOCHS}-epoch run {run_h:.2f} h (plain; {beside}); the {GRID_RUNS}-run Table 2 grid {grid_h:.2f} h ({waves} waves; its {GRID_PENALTY_RUNS} "
          f"input-gradient runs at {exact:.2f}x)")
    figures = {"device": name, "batch": b, "width": args.width,
               **{f"images/s, {k}": b / v for k, v in plain.items()},
               **{f"penalty ratio, {k}": v for k, v in ratios.items()},
               "ablation ratio": r_ablate, **{f"150 epochs h, {k}": v for k, v in hours.items()},
               **{f"packed images/s, k={k}": v for k, v in rates.items()}, "best packing": best_k,
               "150 epochs h, best packing": run_h, "Table 2 grid h, best packing": grid_h}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    print(f"{b / plain[best_setting]:,.0f} images/s ({best_setting}); penalty {exact:.2f}x, finite difference "
          f"{ratios['finite_difference']:.2f}x; ablation {r_ablate:.2f}x; 150 epochs {hours['plain']:.2f} h plain, "
          f"{hours['exact penalty']:.2f} h with the exact penalty; {best_k} packed: {rates[best_k]:,.0f} images/s, "
          f"Table 2 grid {grid_h:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
