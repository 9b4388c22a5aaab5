"""Ray Train overhead: training images/s of a 1-worker TorchTrainer (inside a Tune trial,
exactly as `study train` runs it) against a plain single-process loop with the same
model, data, loader and per-epoch code, measured in one run; plus the device-resident
loader's share of an epoch.

Both sides use the same thread count: Ray sets OMP_NUM_THREADS to a worker's CPU
count (1 here), so the plain loop runs with torch.set_num_threads(1) as well.
Epoch 0 of each side is warm-up and is not counted.

Usage: python benchmarks/train_overhead.py [--width 0.25] [--epochs 4] [--images 4000]
Last line: the figure (Ray Train images/s / plain images/s, and the loader share).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def plain_epochs(dump: dict, num_classes: int, epochs: int) -> tuple[list[float], list[float]]:
    """images/s of each training pass, and the loader's share of each epoch, in-process."""
    from trainables.config import RegularizationConfig
    from trainables.data import build_loaders
    from trainables.loop import train_one_epoch
    from trainables.regularizers import build_model

    t = dump["train"]
    torch.manual_seed(t["seed"])
    model = build_model(dump, num_classes)
    train_loader, _, _ = build_loaders(dump["data"], batch_size=t["batch_size"], seed=t["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    reg = RegularizationConfig.model_validate(dump["regularization"])  # typed once, as the worker does
    rates, shares = [], []
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        sums = train_one_epoch(model, train_loader, opt, reg, None, None, torch.device("cpu"))
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in train_loader:  # the loader alone: index, crop, flip, normalise
            pass
        loader_s = time.perf_counter() - t0
        if epoch:
            rates.append(sums[2].item() / train_s)
            shares.append(loader_s / train_s)
    return rates, shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()

    from study.config import load_config
    from study.train import train

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    cfg = load_config(
        "configs/quickstart.yaml",
        [
            f"model.width={args.width}",
            f"data.num_train={args.images}",
            "data.num_test=500",
            f"train.epochs={args.epochs}",
            f"train.t_max={args.epochs}",
            f"train.batch_size={args.batch_size}",
            "train.num_workers=1",
            "train.cpus_per_worker=1",  # quickstart.yaml gives its one worker both cores; the plain loop has one
            "regularization.focused_dropout.par_rate=0",
            f"tracking.mlflow_uri=sqlite:///{tmp}/mlflow.db",
            f"ray.storage_path={tmp}/ray",
        ],
    )
    dump = cfg.dump()
    print(f"VGG-16-BN width {args.width}, shapes {args.images} images, batch {args.batch_size}, "
          f"{args.epochs} epochs per side (epoch 0 = warm-up), 1 thread each")

    plain_before, shares = plain_epochs(dump, cfg.num_classes, args.epochs)
    print(f"plain loop:  {statistics.median(plain_before):8.1f} images/s  (per epoch: "
          f"{', '.join(f'{r:.0f}' for r in plain_before)})")

    from mlflow.tracking import MlflowClient

    result = train(cfg, quiet=True)
    client = MlflowClient(cfg.tracking.mlflow_uri)
    history = sorted(client.get_metric_history(result.trials[0]["run_id"], "system/images_per_s"),
                     key=lambda m: m.step)
    ray_rates = [m.value for m in history if m.step > 0]
    print(f"Ray Train:   {statistics.median(ray_rates):8.1f} images/s  (per epoch: "
          f"{', '.join(f'{r:.0f}' for r in ray_rates)})")

    plain_after, shares_after = plain_epochs(dump, cfg.num_classes, args.epochs)
    print(f"plain again: {statistics.median(plain_after):8.1f} images/s  (drift check)")
    plain = statistics.median(plain_before + plain_after)
    share = statistics.median(shares + shares_after)
    ratio = statistics.median(ray_rates) / plain
    print(f"Ray Train / plain images/s = {ratio:.3f} (target >= 0.97); loader share of an epoch = {share:.1%} (target <= 3%)")


if __name__ == "__main__":
    main()
