"""Dissection with NetDissect-Lite's semantics equals an independent port of its tally.

The port below follows CSAILVision/NetDissect-Lite ``feature_operation.py``
(``tally_job`` and ``tally``) in plain numpy, reading the fabricated Broden tree
itself (index.csv, label.csv, PNG masks with label = R + 256 G): a unit's area
counts for category g on an image only when some label of g lies inside the
unit's active region there (image-level labels always do), and IoU divides by
that per-category area. Thresholds are the exact (1 - q) quantile of the raw
feature maps. The kit, with ``denominator = per_category`` and ``threshold_on =
raw``, must give the same IoUs (to 1e-6) and labels on a tree where objects are
unlabelled on 40% of the images, while the whole-dataset denominator gives lower
IoUs there.
"""

import csv
import math
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image
from torch import nn

from analysis.broden import BrodenData
from analysis.dissection import iou_pass, label_units, threshold_pass

from .test_dissection import Fixed, np_bilinear

CATEGORIES = ["object", "part", "material", "color"]
LABELS = {1: ("wall", "object"), 2: ("car", "object"), 3: ("wheel", "part"), 4: ("window", "part"),
          5: ("wood", "material"), 6: ("red", "color"), 7: ("blue", "color")}
MASK, N, UNITS, H = 8, 20, 6, 4


def write_partial_broden(root, seed=0):
    """index.csv rows with masks per category; objects unlabelled on 8 of the 20 images, parts on some."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "label.csv").write_text("number,name,category,frequency,coverage,syns\n0,-,,0,0,\n" + "".join(
        f"{k},{name},{cat}(5),5,1.0,\n" for k, (name, cat) in LABELS.items()))
    for cat in CATEGORIES:
        rows = [(k, name) for k, (name, c) in LABELS.items() if c == cat]
        (root / f"c_{cat}.csv").write_text("code,number,name,frequency,coverage\n" + "".join(
            f"{i + 1},{k},{name},5,1\n" for i, (k, name) in enumerate(rows)))
    lines = ["image,split,ih,iw,sh,sw," + ",".join(CATEGORIES)]
    for i in range(N):
        Image.fromarray(np.full((16, 16, 3), i, dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        cells = []
        for cat in CATEGORIES:
            ids = [k for k, (_, c) in LABELS.items() if c == cat]
            unlabelled = (cat == "object" and i % 5 in (1, 3)) or (cat == "part" and i % 3 == 0)
            if unlabelled:
                cells.append("")
                continue
            mask = np.zeros((MASK, MASK), dtype=np.int64)
            for k in ids:  # blobs of each label of the category
                y, x = rng.integers(0, MASK - 3, size=2)
                h, w = rng.integers(2, 5, size=2)
                mask[y:y + h, x:x + w] = k
            if cat == "color":
                mask[mask == 0] = ids[0]  # colour covers every pixel
            png = np.zeros((MASK, MASK, 3), dtype=np.uint8)
            png[:, :, 0], png[:, :, 1] = mask % 256, mask // 256
            Image.fromarray(png).save(root / "images" / f"im{i}_{cat}.png")
            cells.append(f"im{i}_{cat}.png")
        lines.append(f"im{i}.png,val,16,16,{MASK},{MASK}," + ",".join(cells))
    (root / "index.csv").write_text("\n".join(lines) + "\n")


def netdissect_lite_port(root, features, quantile):
    """NetDissect-Lite's tally on ``features`` (N, U, h, w) and the Broden tree at ``root``, in numpy."""
    with open(root / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    K = max(LABELS) + 1
    labelcat = np.zeros((K, len(CATEGORIES)))
    for k, (_, cat) in LABELS.items():
        labelcat[k, CATEGORIES.index(cat)] = 1
    units = features.shape[1]
    flat = features.transpose(1, 0, 2, 3).reshape(units, -1)
    threshold = -np.sort(-flat, axis=1)[:, math.floor(quantile * flat.shape[1])]  # exact raw (1 - q) quantile
    tally_both = np.zeros((units, K))
    tally_units_cat = np.zeros((units, len(CATEGORIES)))
    tally_labels = np.zeros(K)
    for i, row in enumerate(rows):
        pixels = []
        for cat in CATEGORIES:
            if row[cat]:
                rgb = np.asarray(Image.open(root / "images" / row[cat]).convert("RGB"), dtype=np.int64)
                pixels.append((rgb[:, :, 0] + 256 * rgb[:, :, 1])[None])
        pixels = np.concatenate(pixels)
        counts = np.bincount(pixels.ravel(), minlength=K)
        counts[0] = 0
        tally_labels += counts
        for u in range(units):
            mask = np_bilinear(features[i:i + 1, u:u + 1], (MASK, MASK))[0, 0]
            idx = np.argwhere(mask > threshold[u])
            bt = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=K)
            bt[0] = 0
            tally_cat = bt[None, :] @ labelcat
            tally_both[u] += bt
            tally_units_cat[u] += len(idx) * (tally_cat[0] > 0)
    iou = tally_both / (tally_units_cat @ labelcat.T + tally_labels[None, :] - tally_both + 1e-10)
    return threshold, iou[:, 1:]


def test_per_category_dissection_equals_the_netdissect_lite_port(tmp_path):
    write_partial_broden(tmp_path)
    g = torch.Generator().manual_seed(1)
    acts = torch.rand(N, UNITS, H, H, generator=g) * (torch.rand(N, UNITS, H, H, generator=g) > 0.4)
    data = BrodenData(tmp_path, split="val", categories=CATEGORIES)
    _, labels = data.load(range(N))
    ids = torch.arange(N, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 3, 2, 2)
    batches = [(ids[i:i + 7], labels[i:i + 7]) for i in range(0, N, 7)]
    model = nn.Sequential(OrderedDict(fixed=Fixed(acts)))
    q = 0.2
    names = data.concepts.category_names()
    concept_category = torch.tensor([names.index(c) for c in data.concepts.categories])

    top = threshold_pass(model, "fixed", batches, quantile=q, total_positions=N * H * H, device="cpu", on="raw")
    t = top.thresholds(q)
    counts = iou_pass(model, "fixed", batches, t, num_concepts=len(data.concepts), device="cpu",
                      concept_category=concept_category)
    threshold, expected = netdissect_lite_port(tmp_path, acts.double().numpy(), q)

    assert np.allclose(t.double().numpy(), threshold, rtol=0, atol=1e-6)
    assert np.abs(counts.iou.numpy() - expected).max() < 1e-6
    units = label_units(counts, data.concepts, 0.04)
    assert units["label"].tolist() == [LABELS[k + 1][0] for k in expected.argmax(1)]
    assert np.allclose(units["iou"], expected.max(1), atol=1e-6)

    # the whole-dataset denominator counts a unit's area on images without objects too: lower object IoUs
    plain = iou_pass(model, "fixed", batches, t, num_concepts=len(data.concepts), device="cpu")
    objects = [i for i, c in enumerate(data.concepts.categories) if c == "object"]
    assert (plain.iou[:, objects] <= counts.iou[:, objects] + 1e-12).all()
    assert (plain.iou[:, objects] < counts.iou[:, objects] - 1e-3).any()


def test_a_seeded_sample_and_a_category_choice(tmp_path):
    write_partial_broden(tmp_path)
    a = BrodenData(tmp_path, split="val", categories=["object", "color"], max_images=5, seed=3)
    b = BrodenData(tmp_path, split="val", categories=["object", "color"], max_images=5, seed=3)
    c = BrodenData(tmp_path, split="val", max_images=5, seed=4)
    assert [r["image"] for r in a.rows] == [r["image"] for r in b.rows] != [r["image"] for r in c.rows]
    assert [r["image"] for r in a.rows] != [f"im{i}.png" for i in range(5)], "a sample, not the first rows"
    assert a.categories == ["object", "color"]
    _, maps = a.load(range(5))
    assert set(maps.unique().tolist()) <= {0, 1, 2, 6, 7}, "part and material masks are not read"
    try:
        BrodenData(tmp_path, split="val", categories=["scene"])
    except Exception as exc:  # noqa: BLE001
        assert "no category column ['scene']" in str(exc)
    else:
        raise AssertionError("an unknown category is refused")


def write_broden_224(root, n=12, seed=0):
    """A Broden tree as NetDissect-Lite's broden1_224 has it: 224 px images, 112 px masks, the four categories."""
    rng = np.random.default_rng(seed)
    write_partial_broden(root, seed)  # label.csv and c_*.csv; its 8 px rows are replaced below
    lines = ["image,split,ih,iw,sh,sw," + ",".join(CATEGORIES)]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(root / "images" / f"b{i}.jpg")
        cells = []
        for cat in CATEGORIES:
            ids = [k for k, (_, c) in LABELS.items() if c == cat]
            if cat == "object" and i % 5 in (1, 3):
                cells.append("")
                continue
            mask = np.zeros((112, 112, 3), dtype=np.uint8)
            y, x = rng.integers(0, 60, size=2)
            mask[y:y + 50, x:x + 50, 0] = ids[i % len(ids)]
            Image.fromarray(mask).save(root / "images" / f"b{i}_{cat}.png")
            cells.append(f"b{i}_{cat}.png")
        lines.append(f"b{i}.jpg,val,224,224,112,112," + ",".join(cells))
    (root / "index.csv").write_text("\n".join(lines) + "\n")


def test_the_papers_setting_dissects_dissect_format_weights_on_a_broden_224_tree(ray_cluster, tmp_path):
    """configs/places365.yaml end to end on fabricated inputs in the real formats: a dissect-format VGG-16
    Places365 state dict (features.conv5_3.weight, classifier.fc8a.weight) and a broden1_224-shaped tree."""
    from study.dissect import run_dissection
    from trainables.checkpoint import save_checkpoint
    from trainables.models import vgg16

    from .conftest import ROOT

    write_broden_224(tmp_path / "broden")
    torch.manual_seed(0)
    model = vgg16("places365", batch_norm=False, width=0.0625, num_classes=365)
    renamed = {(f"features.{k}" if k.startswith("conv") else f"classifier.{k.replace('fc8', 'fc8a')}"): v
               for k, v in model.state_dict().items()}
    weights = save_checkpoint(tmp_path / "vgg16_places365.pth", renamed)
    sets = [f"dissection.broden_root={tmp_path / 'broden'}", "model.width=0.0625", "train.use_gpu=false",
            f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db", "dissection.num_images=8", "dissection.seed=1"]
    result = run_dissection(str(weights), ROOT / "configs" / "places365.yaml", sets, out=tmp_path / "out",
                            num_shards=2, quiet=True)
    assert result.map_size == (14, 14) and result.warning is None, "conv5_3 is 14x14 at 224 px"
    assert len(result.units) == 32 and result.top.image_max.shape[0] == 8, "a sample of 8 of the 12 images"
    assert result.counts.category_area is not None, "the per-category denominator"
    assert set(result.units["category"]) <= set(CATEGORIES)
    assert result.top.positions == 8 * 14 * 14, "thresholds on the raw maps"
