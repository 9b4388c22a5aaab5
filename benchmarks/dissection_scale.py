"""Dissection at the paper's scale: cost per image, peak memory per task, projected time for all of Broden.

Full-width VGG-16 Places365 (no BatchNorm, random weights) at 224 px, conv5_3 (512 units, 14x14), over ``--images``
fabricated Broden images in broden1_224's on-disk format (224 px JPEGs, 112 px
PNG masks, object/part/material/colour columns), loaded batch by batch as a
``study dissect`` task does. Two settings, each in a fresh process so that its
peak resident memory is its own:

* ``netdissect-lite``: the Broden defaults (thresholds on the raw 14x14 maps by
  top_k, per-category denominator): pass 1 and pass 2 each run the network.
* ``upsampled``: thresholds on the maps upsampled to 112 px by the radix
  histogram (top_k would keep 7.6 GiB per task at full Broden), whole-set
  denominator: two histogram passes and pass 2, each running the network, as
  ``study dissect`` does for Broden (it keeps no activations between tasks).

The network's cost does not depend on the weights, but the passes' pruning does:
they upsample only the (image, unit) pairs whose map peak can exceed the unit's
threshold. A trained unit is selective (few images reach its top 0.5%); a random
one responds to every image much alike, so nearly every pair's peak exceeds t_u
and little is pruned. The script prints the share of pairs pass 2 had to
upsample; with random weights the times are an upper bound for trained ones.

Images are read batch by batch (:class:`analysis.concepts.ConceptBatches`), so a
task's memory does not grow with its shard, except for each image's peak per
unit (2 KB an image at 512 units).

Projection for the whole of Broden (63,305 images): images x measured seconds
per image / devices. Assumes cost linear in images (it is: every pass is per
image), equal shards with one task per device, and no time reading the images
from shared storage, starting tasks or reducing their parts (the driver merges
only per-unit counts). The devices are this machine's kind (CPU threads here; on
a GPU machine pass ``--device cuda``). The last line is the figure.

    .venv/bin/python benchmarks/dissection_scale.py [--images 200] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

BRODEN_IMAGES = 63_305
LABELS = {1: ("wall", "object"), 2: ("car", "object"), 3: ("sky", "object"), 4: ("wheel", "part"),
          5: ("window", "part"), 6: ("wood", "material"), 7: ("glass", "material"), 8: ("red", "color"),
          9: ("blue", "color")}
CATEGORIES = ["object", "part", "material", "color"]


def fabricate(root: Path, n: int) -> None:
    """A broden1_224-shaped tree: label.csv, c_*.csv, index.csv, n JPEGs and their per-category PNG masks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "label.csv").write_text("number,name,category,frequency,coverage,syns\n0,-,,0,0,\n" + "".join(
        f"{k},{name},{cat}(1),1,1.0,\n" for k, (name, cat) in LABELS.items()))
    for cat in CATEGORIES:
        rows = [(k, name) for k, (name, c) in LABELS.items() if c == cat]
        (root / f"c_{cat}.csv").write_text("code,number,name,frequency,coverage\n" + "".join(
            f"{i + 1},{k},{name},1,1\n" for i, (k, name) in enumerate(rows)))
    lines = ["image,split,ih,iw,sh,sw," + ",".join(CATEGORIES)]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        cells = []
        for cat in CATEGORIES:
            if rng.random() < 0.3 and cat != "color":  # Broden labels each category on part of its images
                cells.append("")
                continue
            mask = np.zeros((112, 112, 3), dtype=np.uint8)
            for k in [k for k, (_, c) in LABELS.items() if c == cat]:
                y, x = rng.integers(0, 80, size=2)
                mask[y:y + rng.integers(10, 40), x:x + rng.integers(10, 40), 0] = k
            Image.fromarray(mask).save(root / "images" / f"{i}_{cat}.png")
            cells.append(f"{i}_{cat}.png")
        lines.append(f"{i}.jpg,train,224,224,112,112," + ",".join(cells))
    (root / "index.csv").write_text("\n".join(lines) + "\n")


def run_setting(name: str, root: str, n: int, threads: int, device: str, batch: int, queue) -> None:
    """One setting in this (fresh) process; puts (name, seconds per pass, peak RSS in bytes) on ``queue``."""
    import torch

    from analysis.activations import peak_bound
    from analysis.broden import BrodenData
    from analysis.concepts import concept_batches
    from analysis.dissection import iou_pass
    from analysis.thresholds import histogram_pass, histogram_thresholds, threshold_bins, threshold_pass
    from trainables.datasets import dataset_spec
    from trainables.models import vgg16

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = vgg16("places365", batch_norm=False, width=1.0, num_classes=365).eval().to(device)
    data = BrodenData(root, split=None, categories=CATEGORIES)
    batches = concept_batches(data, range(n), batch_size=batch, mean_std=dataset_spec("places365").mean_std,
                              device=device)
    names = data.concepts.category_names()
    category = torch.tensor([names.index(c) for c in data.concepts.categories])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {}
    t0 = time.perf_counter()
    if name == "netdissect-lite":
        top = threshold_pass(model, "conv5_3", batches, quantile=0.005, total_positions=n * 14 * 14, device=device,
                             on="raw")
        t = top.thresholds(0.005)
        sync()
        times["pass 1 (raw top_k)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        iou_pass(model, "conv5_3", batches, t, num_concepts=len(data.concepts), device=device,
                 concept_category=category)
        sync()
        times["pass 2 (IoU, per category)"] = time.perf_counter() - t0
    else:
        level1 = histogram_pass(model, "conv5_3", batches, device=device)
        sync()
        times["pass 1a (radix level 1)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prefix, _ = threshold_bins(level1, 0.005)
        level2 = histogram_pass(model, "conv5_3", batches, device=device, prefix=prefix)
        t = histogram_thresholds(level1, level2, 0.005)
        sync()
        times["pass 1b (radix level 2)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        iou_pass(model, "conv5_3", batches, t, num_concepts=len(data.concepts), device=device)
        sync()
        times["pass 2 (IoU)"] = time.perf_counter() - t0
        top = level1
    kept = float((peak_bound(top.image_max) > t[None]).double().mean())  # pairs pass 2 upsampled
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    gpu_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    queue.put((name, times, peak, gpu_peak, kept))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="broden-scale-") as tmp:
        root = Path(tmp) / "broden"
        fabricate(root, args.images)
        print(f"{args.images} fabricated Broden images (224 px, 112 px masks), VGG-16 Places365 conv5_3 "
              f"(512 units, 14x14), {args.device}, {args.threads} threads, batch {args.batch}")
        results = {}
        for name in ("netdissect-lite", "upsampled"):
            queue = ctx.Queue()
            proc = ctx.Process(target=run_setting, args=(name, str(root), args.images, args.threads, args.device,
                                                         args.batch, queue))
            proc.start()
            results[name] = queue.get()
            proc.join()
    for name, times, peak, gpu_peak, kept in results.values():
        per_image = sum(times.values()) / args.images
        parts = ", ".join(f"{k} {v / args.images * 1000:.0f} ms" for k, v in times.items())
        gpu = f", GPU peak {gpu_peak / 2**30:.2f} GiB" if gpu_peak else ""
        print(f"{name}: {per_image * 1000:.0f} ms per image ({parts}); peak memory per task "
              f"{peak / 2**30:.2f} GiB resident{gpu}; pass 2 upsampled {kept:.0%} of (image, unit) pairs")
        print(f"  whole Broden ({BRODEN_IMAGES} images): {BRODEN_IMAGES * per_image / 3600:.1f} h on one such task, "
              f"{BRODEN_IMAGES * per_image / 3600 / 8:.1f} h on 8")
    ndl = results["netdissect-lite"]
    per_image = sum(ndl[1].values()) / args.images
    print(f"netdissect-lite semantics: {per_image * 1000:.0f} ms/image, {ndl[2] / 2**30:.2f} GiB/task; whole Broden "
          f"{BRODEN_IMAGES * per_image / 3600:.1f} h on one {args.device} task of {args.threads} threads, "
          f"{BRODEN_IMAGES * per_image / 3600 / 8:.1f} h on 8")


if __name__ == "__main__":
    main()
