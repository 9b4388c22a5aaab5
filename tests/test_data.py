"""Datasets and loaders: shapes, fabricated CIFAR-100 / Places365 trees, device-resident loading."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image
from torchvision.datasets import CIFAR100, Places365

from trainables import data as D
from trainables.errors import DataError

SHAPES_CFG = dict(
    name="shapes", root="data", download=False, image_size=32, num_train=300, num_test=100, seed=3,
    augment=True, crop_padding=4, loader_workers=0,
)


# --------------------------------------------------------------------------- shapes


def test_shapes_is_deterministic_in_its_seed():
    a, b, c = D.make_shapes(64, 32, seed=5), D.make_shapes(64, 32, seed=5), D.make_shapes(64, 32, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.segmentation, b.segmentation)
    assert not torch.equal(a.images, c.images)


def test_shapes_masks_agree_with_labels():
    d = D.make_shapes(200, 32, seed=0)
    n_tex = len(D.TEXTURES)
    assert d.images.dtype == torch.uint8 and d.images.shape == (200, 3, 32, 32)
    assert set(d.labels.tolist()) <= set(range(len(D.SHAPES_CLASSES)))
    for i in range(len(d)):
        shape_kind, texture = divmod(d.labels[i].item(), n_tex)
        shape_map, colour_map, texture_map = d.segmentation[i].long()
        assert set(shape_map.unique().tolist()) == {0, shape_kind + 1}, "only the labelled shape kind is drawn"
        assert set(texture_map.unique().tolist()) == {0, texture + 1}, "background carries the labelled texture"
        objects = shape_map > 0
        assert torch.equal(objects, colour_map > 0), "every object pixel has a colour, no background pixel does"
        assert torch.equal(objects, texture_map == 0), "texture covers exactly the background"
        assert 4 < objects.sum() < 32 * 32 * 0.5


def test_shapes_colour_masks_match_pixel_colours():
    d = D.make_shapes(50, 32, seed=1)
    red = d.concept_mask("colour", "red")
    px = d.images.permute(0, 2, 3, 1).float()  # (N, H, W, 3)
    r, g, b = px[red].unbind(-1)
    assert red.any() and (r > 150).all() and (g < 90).all() and (b < 90).all()
    background = d.segmentation[:, 2] > 0
    grey = px[background]
    assert (grey.max(-1).values - grey.min(-1).values).max() < 60, "backgrounds are grey"


def test_shapes_classes_are_balanced_and_10k_generate():
    d = D.make_shapes(10_000, 32, seed=0)
    counts = d.labels.bincount(minlength=20)
    assert len(D.SHAPES_CLASSES) == 20 and counts.min() > 350


# --------------------------------------------------------------------------- device loader


def _loader(n=103, world=1, rank=0, train=True, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    labels = torch.arange(n)
    return D.DeviceLoader(images, labels, batch_size=8, train=train, rank=rank, world_size=world,
                          augment=False, mean=(0, 0, 0), std=(1 / 255,) * 3, **kw)


@pytest.mark.parametrize("world", [1, 3])
def test_the_head_of_an_evaluation_loader_is_its_first_images_each_seen_once(world):
    seen = [int(y) for rank in range(world) for _, ys in _loader(world=world, rank=rank, train=False).head(20)
            for y in ys]
    assert sorted(seen) == list(range(20))
    with pytest.raises(DataError, match="not of a training one"):
        _loader().head(5)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_shards_are_disjoint_equal_and_cover_all_but_the_remainder(world):
    n = 103
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            loader = _loader(n, world, rank, seed=7)
            loader.set_epoch(epoch)
            shards.append(loader.indices().tolist())
        assert len({len(s) for s in shards}) == 1
        flat = [i for s in shards for i in s]
        assert len(flat) == len(set(flat)) == n - n % world
    a, b = _loader(n, 2, 0, seed=7), _loader(n, 2, 0, seed=7)
    b.set_epoch(1)
    assert a.indices().tolist() != b.indices().tolist(), "a new permutation each epoch"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_cover_every_image_exactly_once(world):
    seen = []
    for rank in range(world):
        for x, y in _loader(101, world, rank, train=False):
            seen += y.tolist()
            assert torch.equal(x[:, 0, 0, 0].long(), y), "labels travel with their images"
    assert sorted(seen) == list(range(101))


def test_train_batches_follow_the_shard_and_drop_the_ragged_tail():
    loader = _loader(103, 2, 1, seed=0)
    ys = [y for _, y in loader]
    assert all(len(y) == 8 for y in ys) and len(ys) == len(loader) == 51 // 8
    assert torch.cat(ys).tolist() == loader.indices()[: 6 * 8].tolist()


def test_normalisation_without_augmentation_is_exact():
    d = D.make_shapes(16, 32, seed=0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = D.DeviceLoader(d.images, d.labels, batch_size=16, train=False, mean=mean, std=std)
    x, _ = next(iter(loader))
    expected = (d.images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5)


def test_augmentation_is_a_padded_crop_possibly_flipped():
    d = D.make_shapes(24, 32, seed=2)
    p = 4
    loader = D.DeviceLoader(d.images, d.labels, batch_size=24, train=True, augment=True, crop_padding=p,
                            mean=(0, 0, 0), std=(1 / 255,) * 3, seed=1)
    x, y = next(iter(loader))
    idx = loader.indices()[:24]
    x = x.round().to(torch.uint8)
    flips = 0
    for out, i in zip(x, idx):
        padded = torch.nn.functional.pad(d.images[i], (p, p, p, p))
        candidates = []
        for oy in range(2 * p + 1):
            for ox in range(2 * p + 1):
                window = padded[:, oy : oy + 32, ox : ox + 32]
                candidates += [(flip, oy, ox) for flip in (False, True) if torch.equal(out, window.flip(2) if flip else window)]
        assert candidates, "each augmented image is a 32x32 window of the zero-padded image (maybe mirrored)"
        flips += candidates[0][0]
    assert 0 < flips < 24


def test_build_loaders_for_shapes_gives_normalised_batches():
    train, val, test = D.build_loaders(SHAPES_CFG, batch_size=32, world_size=2, rank=1, seed=0)
    x, y = next(iter(train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert train.num_images == 300 and val is None and test.num_images == 100 and len(test) == 2


# --------------------------------------------------------------------------- train / validation split


def test_validation_split_is_disjoint_class_stratified_and_seeded():
    labels = torch.arange(20).repeat_interleave(50)[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    train, val = D.train_val_split(labels, 0.1, seed=7)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000)), "together they cover the split"
    assert not set(train.tolist()) & set(val.tolist())
    assert labels[val].bincount(minlength=20).tolist() == [5] * 20, "10% of every class"
    again, other = D.train_val_split(labels, 0.1, seed=7)[1], D.train_val_split(labels, 0.1, seed=8)[1]
    assert torch.equal(val, again) and not torch.equal(val, other)
    train0, val0 = D.train_val_split(labels, 0.0, seed=7)
    assert val0.numel() == 0 and torch.equal(train0, torch.arange(1000))


def test_a_validation_fraction_that_leaves_no_image_is_one_clear_error():
    with pytest.raises(DataError, match="leaves no image for validation"):
        D.train_val_split(torch.arange(20), 0.01, seed=0)


@pytest.mark.parametrize("world_size", [1, 3])
def test_no_rank_trains_on_a_validation_image(world_size):
    cfg = dict(SHAPES_CFG, val_fraction=0.2)
    all_x, all_y = D.load_arrays(cfg, train=True)
    _, val_idx = D.train_val_split(all_y, 0.2, seed=cfg["seed"])
    val_images = {bytes(all_x[i].numpy()) for i in val_idx.tolist()}
    assert len(val_images) == val_idx.numel(), "generated images are distinct"
    seen_val = []
    for rank in range(world_size):
        train, val, _ = D.build_loaders(cfg, batch_size=16, world_size=world_size, rank=rank, seed=0)
        held = {bytes(x.numpy()) for x in train.images}
        assert not held & val_images, "the training tensor holds no validation image"
        for epoch in range(3):
            train.set_epoch(epoch)
            assert not set(train.dataset_indices[train.indices()].tolist()) & set(val_idx.tolist())
        seen_val += val.dataset_indices[val.indices()].tolist()
        assert torch.equal(val.labels, all_y[val.dataset_indices])
    assert sorted(seen_val) == val_idx.tolist(), "the ranks' validation blocks cover it exactly once"


# --------------------------------------------------------------------------- fabricated torchvision trees


def fake_cifar100(root: Path, n_train=40, n_test=20) -> None:
    base = root / CIFAR100.base_folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": rng.integers(0, 100, n).tolist(),
            "coarse_labels": rng.integers(0, 20, n).tolist(),
        }
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)


def official(root, monkeypatch):
    """Make torchvision's checksum table name the fabricated files' MD5s, so every integrity check runs for real."""
    import hashlib

    base = root / CIFAR100.base_folder
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in base.iterdir()}
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})


def test_fabricated_cifar100_loads_through_torchvision(tmp_path, monkeypatch):
    # only the checksum checks are patched (the class's and the meta file's)
    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    fake_cifar100(tmp_path)
    images, labels = D.load_cifar100(tmp_path, train=True)
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8
    # CIFAR rows are channel-major 3x32x32: the first 1024 bytes are the red plane
    assert torch.equal(images[0, 0].flatten(), torch.from_numpy(raw["data"][0, :1024]))
    assert labels.tolist() == raw["fine_labels"]
    cfg = dict(SHAPES_CFG, name="cifar100", root=str(tmp_path))
    train, _, test = D.build_loaders(cfg, batch_size=8)
    assert test.num_images == 20 and next(iter(train))[0].shape == (8, 3, 32, 32)


def test_missing_cifar100_offline_is_one_clear_error(tmp_path):
    with pytest.raises(DataError) as info:
        D.load_cifar100(tmp_path / "nowhere", train=True)
    msg = str(info.value)
    assert "nowhere" in msg and "data.download=true" in msg


def fake_places365(root: Path, n_classes=3, per_class=2, n_val=4) -> None:
    classes = [f"/{c[0]}/{c}" for c in ("airfield", "bakery", "canyon")[:n_classes]]
    (root / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(classes)))
    rng = np.random.default_rng(0)
    lines = []
    for i, c in enumerate(classes):
        for j in range(per_class):
            rel = f"{c}/{j + 1:08d}.jpg"
            path = root / "data_256_standard" / rel.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
            lines.append(f"{rel} {i}\n")
    (root / "places365_train_standard.txt").write_text("".join(lines))
    (root / "val_256").mkdir()
    val = []
    for j in range(n_val):
        name = f"Places365_val_{j + 1:08d}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "val_256" / name)
        val.append(f"{name} {j % n_classes}\n")
    (root / "places365_val.txt").write_text("".join(val))


def test_fabricated_places365_loads_through_torchvision(tmp_path, monkeypatch):
    monkeypatch.setattr(Places365, "_check_integrity", lambda self, file, md5, download: True)
    fake_places365(tmp_path)
    cfg = dict(SHAPES_CFG, name="places365", root=str(tmp_path), image_size=32)
    train, _, test = D.build_loaders(cfg, batch_size=2, world_size=2, rank=0)
    xs, ys = zip(*list(train))
    assert len(xs) == 1 and xs[0].shape == (2, 3, 32, 32), "3 of 6 train images per rank, ragged tail dropped"
    assert test.num_images == 4
    seen = []
    for rank in range(2):
        _, _, t = D.build_loaders(cfg, batch_size=4, world_size=2, rank=rank)
        seen += [y for _, yb in t for y in yb.tolist()]
    assert sorted(seen) == sorted([0, 1, 2, 0])


def test_missing_places365_offline_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="Places365 was not found under"):
        D.places365_dataset(tmp_path, train=True)
