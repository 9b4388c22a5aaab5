"""The dataset registry: every spec is consistent, and each dataset loads (or fails) through its spec.

Offline and fast: shapes is generated, CIFAR-100 and Places365 are fabricated
trees in torchvision's on-disk formats under tmp_path (only checksums patched).
"""

import pickle
import typing

import pytest
import torch
from torchvision.datasets import CIFAR100, Places365

from tests.test_data import SHAPES_CFG, fake_cifar100, fake_places365, official
from trainables import data as D
from trainables.config import DataConfig
from trainables.datasets import DATASETS, MEAN_STD, NUM_CLASSES, DatasetSpec, as_data_config, dataset_spec
from trainables.errors import ConfigError, DataError
from trainables.shapes import CATEGORIES, SHAPES_CLASSES, make_shapes


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_registered_spec_is_consistent(name):
    spec = DATASETS[name]
    assert isinstance(spec, DatasetSpec) and spec.name == name and dataset_spec(name) is spec
    assert isinstance(spec.num_classes, int) and spec.num_classes >= 2
    mean, std = spec.mean_std
    assert len(mean) == len(std) == 3
    assert all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std)
    names = spec.class_names()
    assert names is None or (len(names) == spec.num_classes and len(set(names)) == len(names))
    assert isinstance(spec.in_memory, bool)
    # the derived views the older code indexes by name
    assert NUM_CLASSES[name] == D.NUM_CLASSES[name] == spec.num_classes
    assert MEAN_STD[name] == D.MEAN_STD[name] == spec.mean_std


def test_the_config_accepts_exactly_the_registered_names():
    assert set(typing.get_args(DataConfig.model_fields["name"].annotation)) == set(DATASETS)


def test_an_unknown_dataset_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; known datasets: shapes, cifar100, places365"):
        dataset_spec("imagenet")
    with pytest.raises(ConfigError, match="invalid data section"):
        as_data_config({"name": "imagenet"})


def test_a_data_section_is_accepted_as_a_dict_or_a_dataconfig():
    cfg = as_data_config(SHAPES_CFG)
    assert isinstance(cfg, DataConfig) and cfg.num_train == 300 and as_data_config(cfg) is cfg
    x_dict, y_dict = D.load_arrays(SHAPES_CFG, train=False)
    x_cfg, y_cfg = D.load_arrays(cfg, train=False)
    assert torch.equal(x_dict, x_cfg) and torch.equal(y_dict, y_cfg)
    full = DataConfig(**{**SHAPES_CFG, "val_fraction": 0.2})
    fit, val = D.split_of(full, y_cfg)
    assert torch.equal(val, D.split_of(full.model_dump(), y_cfg)[1]) and 0 < val.numel() < fit.numel()
    train, val_loader, _ = D.build_loaders(full, batch_size=16)
    _, expected_val = D.split_of(full, D.load_arrays(full, train=True)[1])
    assert torch.equal(val_loader.dataset_indices, expected_val) and train.num_images + val_loader.num_images == 300


# --------------------------------------------------------------------------- shapes


def test_shapes_arrays_are_make_shapes_at_the_configured_seeds(tmp_path):
    spec = dataset_spec("shapes")
    cfg = dict(SHAPES_CFG, num_train=50, num_test=30, image_size=24, seed=7, root=str(tmp_path / "none"))
    for train, n, seed in ((True, 50, 7), (False, 30, 8)):
        expected = make_shapes(n, 24, seed)
        images, labels = spec.arrays(cfg, train)
        assert torch.equal(images, expected.images) and torch.equal(labels, expected.labels)
        assert torch.equal(spec.labels(cfg, train), expected.labels)
    assert spec.in_memory and spec.num_classes == len(SHAPES_CLASSES)
    assert spec.class_names() == list(SHAPES_CLASSES)
    spec.check_present(cfg)  # generated: never missing
    assert spec.dissection_image_size(cfg) == 24
    lines = spec.summary_lines(cfg)
    assert lines[0].startswith("shapes: 50 train + 30 test images of (3, 24, 24) uint8, 20 classes")
    assert [line.split()[0] for line in lines[1:]] == list(CATEGORIES)


# --------------------------------------------------------------------------- cifar100


def test_cifar100_loads_from_a_fabricated_tree(tmp_path, monkeypatch):
    fake_cifar100(tmp_path, n_train=40, n_test=20)
    official(tmp_path, monkeypatch)
    spec = dataset_spec("cifar100")
    cfg = DataConfig(name="cifar100", root=str(tmp_path))
    spec.check_present(cfg)
    images, labels = spec.arrays(cfg, train=True)
    raw = pickle.loads((tmp_path / CIFAR100.base_folder / "train").read_bytes())
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.equal(images[3, 2].flatten(), torch.from_numpy(raw["data"][3, 2048:]))  # the blue plane
    assert labels.tolist() == raw["fine_labels"]
    assert spec.labels(cfg.model_dump(), train=False).shape == (20,)
    assert spec.in_memory and spec.dissection_image_size(cfg) == 32
    assert spec.summary_lines(cfg)[0].startswith("cifar100: 40 train + 20 test images of (3, 32, 32) uint8, 100 classes")


def test_a_damaged_cifar100_file_is_one_line_before_any_ray_work(tmp_path, monkeypatch, capsys):
    """Before: 95 lines from inside a Train worker, ending in "max() arg is an empty sequence"."""
    from study.cli import main

    fake_cifar100(tmp_path / "data", n_train=40, n_test=20)
    official(tmp_path / "data", monkeypatch)
    train = tmp_path / "data" / CIFAR100.base_folder / "train"
    train.write_bytes(train.read_bytes()[:5000])  # truncated
    with pytest.raises(DataError, match="CIFAR-100 under .* is damaged: .*train does not match its checksum"):
        dataset_spec("cifar100").check_present({"name": "cifar100", "root": str(tmp_path / "data")})
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["train", "--set", "data.name=cifar100", "--set", f"data.root={tmp_path / 'data'}", "--set",
                     "model.variant=cifar", "--set", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
                     "--set", f"ray.storage_path={tmp_path}/ray"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CIFAR-100 under") and "download it again" in err[0], err
    assert not (tmp_path / "ray").exists(), "no Ray work began"
    train.unlink()
    with pytest.raises(DataError, match="is incomplete: .*train is missing"):
        dataset_spec("cifar100").check_present({"name": "cifar100", "root": str(tmp_path / "data")})


def test_missing_cifar100_gives_the_download_hint(tmp_path):
    spec = dataset_spec("cifar100")
    cfg = {"name": "cifar100", "root": str(tmp_path / "nowhere")}
    for load in (spec.check_present, lambda c: spec.arrays(c, train=True)):
        with pytest.raises(DataError, match="CIFAR-100 was not found under") as info:
            load(cfg)
        assert "nowhere" in str(info.value) and "data.download=true" in str(info.value)
    spec.check_present({**cfg, "download": True})  # downloads on: the worker fetches it


# --------------------------------------------------------------------------- places365


def test_places365_is_streamed_from_a_fabricated_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(Places365, "_check_integrity", lambda self, file, md5, download: True)
    fake_places365(tmp_path)
    spec = dataset_spec("places365")
    cfg = DataConfig(name="places365", root=str(tmp_path), image_size=32)
    spec.check_present(cfg)
    assert not spec.in_memory
    assert spec.labels(cfg, train=True).tolist() == [0, 0, 1, 1, 2, 2]
    assert spec.labels(cfg, train=False).tolist() == [0, 1, 2, 0]
    assert spec.dataset(cfg, train=False, augment=False)[0][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match="does not fit the in-memory loader"):
        spec.arrays(cfg, train=True)
    assert spec.summary_lines(cfg) == [f"places365 under {tmp_path}: 6 train, 4 val images, 3 classes"]


def test_missing_places365_gives_the_download_hint(tmp_path):
    with pytest.raises(DataError, match="Places365 was not found under .*data.download=true"):
        dataset_spec("places365").check_present({"name": "places365", "root": str(tmp_path)})


def test_a_damaged_places365_image_or_listing_is_one_line_up_front(tmp_path):
    fake_places365(tmp_path)
    spec, cfg = dataset_spec("places365"), {"name": "places365", "root": str(tmp_path)}
    first = tmp_path / "val_256" / "Places365_val_00000001.jpg"
    first.write_bytes(first.read_bytes()[:200])  # a truncated JPEG
    with pytest.raises(DataError, match=r"Places365 image .*Places365_val_00000001.jpg is damaged"):
        spec.check_present(cfg)
    first.unlink()
    with pytest.raises(DataError, match=r"Places365 image .*Places365_val_00000001.jpg is missing"):
        spec.check_present(cfg)
