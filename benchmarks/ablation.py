"""All-unit ablation of conv5_3: fast path vs one evaluation pass vs the naive loop.

Evidence (2-core shared CPU, torch 2.14.1, defaults: width 1.0, 256 images,
batches of 128, random weights, 11.7% of (unit, image) pairs skipped): one
eval pass 1.04 s, fast all-unit ablation 1.54 s, naive loop 536 s
(extrapolated from 4 units) -> "fast ablation = 1.49x one eval pass;
naive/fast = 348x"; repeated runs gave 1.47x-1.50x. The floor is set by
FLOPs: after the shared trunk, each live (unit, image) pair costs fc7 + fc8
(512 x 612 MACs); 512 units of that are 0.51x the trunk's MACs per image, so
fast/eval ~ 1 + 0.51 x (share of live pairs); the trunk is 313M MACs per
32 px image. How many pairs a trained network lets us skip depends on how
sparse its conv5_3 is: measure it with ``--checkpoint``.

Measured side by side in one run on the same model and images:

(a) one plain evaluation pass (``analysis.evaluation.evaluate_class_counts``);
(b) the fast all-unit ablation (``ablate_units``: trunk once, unit index as a
    batch dimension, rank-1 update of fc6, zero-contribution pairs skipped);
(c) the naive loop (``ablate_units_naive``: one full forward per unit), timed on
    ``--naive-units`` units and EXTRAPOLATED to all units: it costs one baseline
    pass plus one pass per unit, so time(all) = time(n) * (U + 1) / (n + 1).

(a) and (b) alternate for ``--repeat`` rounds and the fastest run of each is
kept (the machine may be shared). The model has random weights unless ``--checkpoint``
gives a trained one; the share of (unit, image) pairs skipped because the unit
is already zero depends on the weights and is printed.

The last line is the figure: ``fast ablation = R1x one eval pass; naive/fast = R2x``.
Target: R1 <= 1.5.
"""

from __future__ import annotations

import argparse
import time

import torch

from analysis.ablation import ablate_units, ablate_units_naive
from analysis.evaluation import evaluate_class_counts
from analysis.hooks import retain_layers, unit_layer
from trainables.checkpoint import load_checkpoint
from trainables.data import MEAN_STD, DeviceLoader, make_shapes
from trainables.models import infer_architecture, load_vgg16_state_dict, vgg16


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _interleaved(fns: dict, repeat: int) -> tuple[dict, dict]:
    """Fastest of ``repeat`` timings of each function, the functions alternating within each round."""
    best = {name: float("inf") for name in fns}
    out = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync()
            t = time.perf_counter()
            out[name] = fn()
            _sync()
            best[name] = min(best[name], time.perf_counter() - t)
    return best, out


def train(model, epochs: int, num_classes: int, device) -> None:
    """Plain SGD on 4,000 shapes images of another seed than the measured ones, printing each epoch's accuracy."""
    data = make_shapes(4000, 32, seed=1)
    mean, std = MEAN_STD["shapes"]
    loader = DeviceLoader(data.images, data.labels % num_classes, batch_size=64, mean=mean, std=std, train=True,
                          augment=False, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        correct = seen = 0
        for x, y in loader:
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        print(f"trained epoch {epoch + 1}/{epochs}: train accuracy {correct / seen:.1%}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--layer", default="conv5_3")
    ap.add_argument("--naive-units", type=int, default=4, help="units the naive loop really runs (then extrapolated)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of (eval, fast), fastest kept")
    ap.add_argument("--checkpoint", default=None, help="a trained cifar-variant checkpoint (default: random weights)")
    ap.add_argument("--train-epochs", type=int, default=0,
                    help="first train the model this many epochs on 4,000 other shapes images (SGD, batch 64)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    num_classes = 100
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        state = state.get("model", state)
        arch = infer_architecture(state)
        num_classes = arch["num_classes"]
        model = vgg16(arch["variant"], batch_norm=arch["batch_norm"], width=arch["width"], num_classes=num_classes)
        load_vgg16_state_dict(model, state)
    else:
        model = vgg16("cifar", batch_norm=True, width=args.width, num_classes=num_classes)
    model = model.to(args.device)
    if args.train_epochs:
        train(model, args.train_epochs, num_classes, args.device)
    model = model.eval()

    data = make_shapes(args.images, 32, seed=0)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD["shapes"])
    x = ((data.images.float() / 255 - mean) / std).to(args.device)
    y = (data.labels % num_classes).to(args.device)
    batches = [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, len(y), args.batch_size)]
    kw = dict(device=args.device, num_classes=num_classes)

    site = unit_layer(model, args.layer)
    with torch.no_grad(), retain_layers(model, [site, "flatten"]) as kept:
        model(x[: args.batch_size])
    units = kept[site].shape[1]
    # for conv5_3 a (unit, image) pair is skipped when the unit's pooled fc6 inputs are all zero
    fc6_input = kept["flatten"].reshape(kept["flatten"].shape[0], units, -1)
    skip = kept[site] if args.layer not in ("conv5_3", "relu5_3") else fc6_input
    zero_share = float(skip.flatten(2).eq(0).all(-1).float().mean())

    evaluate_class_counts(model, batches[:1], **kw)  # warm-up (allocator, kernels)
    n = min(args.naive_units, units)
    best, out = _interleaved(
        {
            "eval": lambda: evaluate_class_counts(model, batches, **kw),
            "fast": lambda: ablate_units(model, args.layer, batches, **kw),
        },
        args.repeat,
    )
    t_eval, t_fast, base, fast = best["eval"], best["fast"], out["eval"], out["fast"]
    t_sub, naive = _interleaved(
        {"naive": lambda: ablate_units_naive(model, args.layer, batches, list(range(n)), **kw)}, 1
    )
    t_sub, naive = t_sub["naive"], naive["naive"]
    t_naive = t_sub * (units + 1) / (n + 1)
    agree = torch.equal(naive.correct, fast.select(list(range(n))).correct)

    print(f"device {args.device}, threads {torch.get_num_threads()}, VGG-16 cifar variant width {args.width}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}"
          f"{f', then trained {args.train_epochs} epochs' if args.train_epochs else ''}")
    print(f"{len(y)} images in batches of {args.batch_size}; layer {args.layer}: {units} units; "
          f"baseline accuracy {base.accuracy:.4f}")
    print(f"(unit, image) pairs skipped as already zero (first batch): {zero_share:.1%}")
    print(f"(a) one eval pass              {t_eval:8.3f} s   (best of {args.repeat})")
    print(f"(b) fast ablation, {units} units  {t_fast:8.3f} s   (best of {args.repeat})")
    print(f"(c) naive loop, {units} units     {t_naive:8.3f} s   EXTRAPOLATED from units 0..{n - 1} "
          f"({t_sub:.3f} s for {n} units + baseline, x {units + 1}/{n + 1})")
    print(f"naive and fast counts agree on units 0..{n - 1}: {agree}")
    print(f"fast ablation = {t_fast / t_eval:.2f}x one eval pass; naive/fast = {t_naive / t_fast:.0f}x")


if __name__ == "__main__":
    main()
