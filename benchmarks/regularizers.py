"""Training-step time of the paper's regularizers, as ratios to a plain step.

One SGD step (forward, backward, update) through ``trainables.regularizers``
(``build_model`` + ``batch_loss``, the code the training loop runs) on the same
VGG-16 (cifar variant, 32 px, batch norm) for five methods: plain, dropout 0.2,
FocusedDropout (par_rate = 1, so every step pays for it), the exact input-gradient
penalty (double backprop) and the finite-difference one (Finlay & Oberman).
The methods are interleaved within each repeat (order rotated) and timed side by
side; each ratio is the median over repeats of the method's step time divided by
the plain step time of the same repeat. The last printed line is the figure.

Targets (CPU, width 1.0): FocusedDropout <= 1.10x, exact <= 2.0x, finite difference <= 1.6x. The lazy
penalty (``gradient_penalty.every = k``) is printed as its amortized cost per step at k = 4 and k = 16.

    python benchmarks/regularizers.py --width 1.0 --batch-size 64 --steps 6 --warmup 1

On a CPU shared with other jobs, ``--threads 1`` avoids OpenMP barrier stalls,
which penalize the methods made of many small ops (double backprop) the most.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainables.config import RegularizationConfig
from trainables.regularizers import batch_loss, build_model

NUM_CLASSES = 100


def config(
    width: float, par_rate: float = 0.0, dropout: float = 0.0, lam: float = 0.0, method: str = "double_backprop"
) -> dict:
    """A ``StudyConfig.dump()``-shaped dict holding only what build_model and batch_loss read."""
    return {
        "model": {"variant": "cifar", "batch_norm": True, "width": width, "num_classes": NUM_CLASSES},
        "regularization": {
            "focused_dropout": {"par_rate": par_rate, "gamma": [0.6, 0.9], "site": "pool4"},
            "dropout": {"rate": dropout},
            "gradient_penalty": {"lambda": lam, "method": method, "h": 0.01},
        },
        "train": {"seed": 0},
    }


def methods(width: float) -> dict[str, dict]:
    return {
        "plain": config(width),
        "dropout": config(width, dropout=0.2),
        "focused_dropout": config(width, par_rate=1.0),
        "exact": config(width, lam=0.1, method="double_backprop"),
        "finite_difference": config(width, lam=0.1, method="finite_difference"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="VGG-16 channel multiplier (1.0 = the paper)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    runs = {}
    for name, cfg in methods(args.width).items():
        torch.manual_seed(0)
        model = build_model(cfg).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
        runs[name] = (model, opt, RegularizationConfig.model_validate(cfg["regularization"]))  # typed once
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)  # (B, 3, 32, 32)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g).to(device)  # (B,)

    def step(name: str) -> float:
        model, opt, reg = runs[name]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _, _ = batch_loss(model, x, y, reg)  # no host sync: metrics stay on the device
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    names = list(runs)
    for _ in range(args.warmup):
        for name in names:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.steps):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each repeat
            times[name].append(step(name))

    # Each method's time over the plain step of the same repeat, then the median over repeats:
    # paired ratios cancel slow drifts in machine load that per-method medians would keep.
    ratio = {name: statistics.median(t / p for t, p in zip(times[name], times["plain"])) for name in names}
    print(
        f"VGG-16 cifar, width {args.width}, batch {args.batch_size}, {device}, "
        f"threads={torch.get_num_threads()}, {args.steps} timed steps per method:"
    )
    for name, t in times.items():
        print(
            f"  {name:18s} median {1e3 * statistics.median(t):8.1f} ms  "
            f"(min {1e3 * min(t):.1f}, max {1e3 * max(t):.1f})  paired ratio {ratio[name]:.2f}x"
        )
    # Lazy regularization (regularization.gradient_penalty.every = k): one penalised step and k - 1 plain ones,
    # so a step costs (ratio + k - 1) / k of a plain step on average.
    lazy = {f"{name} k={k}": (ratio[name] + k - 1) / k for name in ("exact", "finite_difference") for k in (4, 16)}
    print("amortized with gradient_penalty.every = k: " + ", ".join(f"{n} {v:.2f}x" for n, v in lazy.items()))
    print("ratios vs plain: " + ", ".join(f"{name} {ratio[name]:.2f}x" for name in names[1:]) + "; "
          + ", ".join(f"{n} {v:.2f}x" for n, v in lazy.items()))

if __name__ == "__main__":
    main()
