"""Dissection time (both passes) / one plain evaluation pass over the same images; and what the labels' null costs.

VGG-16 (cifar variant, width 1.0, BN) at conv5_3 on shapes images (32x32, masks
32x32, 15 concepts), q = 0.01; CPU, measured side by side in one run (best of
``--repeats``). The dissection runs the trunk once (to conv5_3, pass 1 keeps the
activations, pass 2 reuses them); the evaluation runs the whole network.
Target: <= 1.5. The last printed line is the figure.

The null (:mod:`analysis.nulls`: pass 2's per-image cell sums, then the p-values)
is timed as the dissection with it / without it, at conv5_3 (2x2 maps) and at
conv3_3 (8x8 maps, the quickstart's layer); limit 2x.

    .venv/bin/python benchmarks/dissection.py [--images 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from analysis.concepts import ShapesConcepts, concept_batches
from analysis.dissection import dissect_layer
from analysis.evaluation import evaluate_class_counts
from trainables.data import MEAN_STD
from trainables.models import vgg16


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vgg16("cifar", batch_norm=True, width=1.0, num_classes=20).eval()
    data = ShapesConcepts.generate(args.images, 32, seed=0)
    batches = concept_batches(data, range(args.images), batch_size=100, mean_std=MEAN_STD["shapes"])
    labelled = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x, _ in batches]

    evaluate_class_counts(model, labelled[:1], device="cpu", num_classes=20)  # warm-up
    dissect_layer(model, "conv5_3", batches[:1], data.concepts, device="cpu")
    t_eval = best_of(lambda: evaluate_class_counts(model, labelled, device="cpu", num_classes=20), args.repeats)
    t_dis = best_of(lambda: dissect_layer(model, "conv5_3", batches, data.concepts, device="cpu"), args.repeats)
    for layer in ("conv5_3", "conv3_3"):
        dissect_layer(model, layer, batches[:1], data.concepts, device="cpu")  # warm-up
        times = {True: [], False: []}
        for _ in range(args.repeats):  # alternated, so a busy moment does not land on one side only
            for null in (True, False):
                times[null].append(best_of(lambda: dissect_layer(model, layer, batches, data.concepts, device="cpu",
                                                                 null=null), 1))
        with_null, without = min(times[True]), min(times[False])
        print(f"{layer}: dissection with the labels' null {with_null:.3f} s, without {without:.3f} s: "
              f"{with_null / without:.2f}x (limit 2x)")
    print(f"{args.images} images, {args.threads} threads: evaluation {t_eval:.3f} s, dissection {t_dis:.3f} s")
    print(f"dissection / evaluation = {t_dis / t_eval:.2f}x (target <= 1.5x)")
    print(f"{t_dis / t_eval:.2f}")


if __name__ == "__main__":
    main()
