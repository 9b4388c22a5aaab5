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
   CIFAR-100 on the device; evaluation passes not counted).

Without CUDA it prints one line saying it skipped (``--device cpu`` runs it small
on the CPU, to check the script). The last line is the figure.

    python benchmarks/gpu.py [--batch-size 128] [--steps 20] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.ablation import ablate_units  # noqa: E402
from analysis.evaluation import evaluate_class_counts  # noqa: E402
from trainables.config import WorkerConfig  # noqa: E402
from trainables.regularizers import batch_loss, build_model  # noqa: E402

EPOCHS, TRAIN_IMAGES = 150, 50_000  # the paper's CIFAR-100 schedule


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
    args = ap.parse_args()
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
    print(f"{b / plain[best_setting]:,.0f} images/s ({best_setting}); penalty {exact:.2f}x, finite difference "
          f"{ratios['finite_difference']:.2f}x; ablation {r_ablate:.2f}x; 150 epochs {hours['plain']:.2f} h plain, "
          f"{hours['exact penalty']:.2f} h with the exact penalty")
    return 0


if __name__ == "__main__":
    sys.exit(main())
