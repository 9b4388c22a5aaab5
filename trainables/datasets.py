"""The dataset registry: one :class:`DatasetSpec` per dataset, and all that is known about it.

Adding a dataset is one spec here (plus its test); nothing else compares
dataset names. A spec says how many classes the dataset has, how to normalise
it, whether it is held in memory (the whole split as uint8 tensors for a
:class:`~trainables.data.DeviceLoader`) or streamed from files (a torch
``Dataset`` for a :class:`~trainables.data.SamplerLoader`), how to check that
it is on disk, and how to load it.

* ``shapes``: generated offline, deterministic from a seed (:mod:`trainables.shapes`);
  the train split uses ``data.seed`` and the test split ``data.seed + 1``.
* ``cifar100``: torchvision ``CIFAR100``, held in memory.
* ``places365``: torchvision ``Places365`` (small 256 px images), streamed;
  train-standard is the training split and the official val split plays ``test``.

torchvision datasets are downloaded only when ``data.download`` is true, once
per node (:func:`download_lock`); otherwise a missing dataset is one :class:`DataError` naming the path and how
to get it. Every function taking ``data`` (the data section) accepts a
:class:`~trainables.config.DataConfig` or a plain dict of one (a
``StudyConfig.dump()["data"]``), validated once by :func:`as_data_config`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import time
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import ValidationError

from trainables.config import DataConfig
from trainables.errors import ConfigError, DataError
from trainables.shapes import CATEGORIES, CONCEPTS, SHAPES, SHAPES_CLASSES, TEXTURES, make_shapes

__all__ = [
    "DATASETS", "MEAN_STD", "NUM_CLASSES", "Cifar100Spec", "DatasetSpec", "Places365Spec", "ShapesSpec",
    "as_data_config", "check_image", "dataset_spec", "download_lock", "opened_image", "load_cifar100",
    "places365_dataset",
]

MeanStd = tuple[tuple[float, float, float], tuple[float, float, float]]


def as_data_config(data: DataConfig | Mapping[str, Any]) -> DataConfig:
    """``data`` as a :class:`DataConfig`: returned as is, or a dict validated once (missing keys take the defaults)."""
    if isinstance(data, DataConfig):
        return data
    if isinstance(data, Mapping):
        try:
            return DataConfig.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(f"invalid data section: {exc}") from None
    raise TypeError(f"expected a DataConfig or a dict of one, got {type(data).__name__}")


def _download_hint(name: str, root: Path, expected: str) -> str:
    return (
        f"{name} was not found under {root} (expected {expected}); set data.download=true on a machine "
        f"with internet access, or place the dataset there yourself, or set data.root to where it is"
    )


class DatasetSpec:
    """What the kit knows about one dataset. Subclass it and register an instance in :data:`DATASETS`.

    Attributes:
        name: the ``data.name`` that selects it.
        num_classes: classes of its labels (``model.num_classes`` defaults to this).
        mean_std: per-channel (mean, std) in [0, 1] that inputs are normalised with.
        in_memory: True: :meth:`arrays` gives a whole split as uint8 tensors (DeviceLoader);
            False: :meth:`dataset` gives a torch Dataset of files (SamplerLoader).
        test_split: what the dataset calls the split the kit uses as ``test``.
    """

    name: ClassVar[str]
    num_classes: ClassVar[int]
    mean_std: ClassVar[MeanStd]
    in_memory: ClassVar[bool]
    test_split: ClassVar[str] = "test"

    def class_names(self) -> list[str] | None:
        """Names of the classes in label order, or None where the kit has none to hand."""
        return None

    def check_present(self, data: DataConfig | Mapping[str, Any]) -> None:
        """A :class:`DataError` with the download hint when the dataset is missing and downloads are off."""

    def arrays(self, data: DataConfig | Mapping[str, Any], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split as ((N, 3, H, W) uint8, (N,) int64) on the CPU (in-memory datasets only)."""
        raise DataError(f"dataset '{self.name}' does not fit the in-memory loader; use build_loaders")

    def dataset(self, data: DataConfig | Mapping[str, Any], train: bool, augment: bool):
        """A split as a torch Dataset with ``.targets`` yielding normalised float images (streamed datasets only)."""
        raise DataError(f"dataset '{self.name}' is held in memory; load it with arrays()")

    def labels(self, data: DataConfig | Mapping[str, Any], train: bool) -> torch.Tensor:
        """(N,) int64 labels of the train or test split."""
        if self.in_memory:
            return self.arrays(data, train)[1]
        return torch.as_tensor(self.dataset(data, train, augment=False).targets, dtype=torch.int64)

    def summary_lines(self, data: DataConfig | Mapping[str, Any]) -> list[str]:
        """What ``study data summary`` prints: the splits' sizes and the classes."""
        data = as_data_config(data)
        t0 = time.perf_counter()
        if not self.in_memory:
            train = self.dataset(data, True, augment=False)
            test = self.dataset(data, False, augment=False)
            classes = len(getattr(train, "classes", ())) or self.num_classes
            return [(f"{self.name} under {data.root}: {len(train)} train, {len(test)} {self.test_split} images, "
                     f"{classes} classes")]
        train_x, train_y = self.arrays(data, train=True)
        test_x, _ = self.arrays(data, train=False)
        seconds = time.perf_counter() - t0
        counts = train_y.bincount(minlength=self.num_classes)
        return [(
            f"{self.name}: {train_x.shape[0]} train + {test_x.shape[0]} test images of "
            f"{tuple(train_x.shape[1:])} uint8, {self.num_classes} classes "
            f"({counts.min().item()}-{counts.max().item()} train images per class), loaded in {seconds:.1f} s"
        )]

    def source(self, data: DataConfig | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """(MLflow dataset source type, what identifies the files) for a run's dataset input."""
        data = as_data_config(data)
        return "local", {"root": data.root}

    def dissection_image_size(self, data: DataConfig | Mapping[str, Any]) -> int:
        """Default side in px of the generated shapes-concept images that dissect a model of this dataset:
        the size it trains on (a network is trained, ablated and dissected at one input size)."""
        return as_data_config(data).image_size

    def concept_classes(self) -> dict[str, list[int]]:
        """For each dissection concept that the class labels name, the classes whose images contain it
        (the join of labels and ablations, :mod:`analysis.unit_join`); none by default."""
        return {}


# --------------------------------------------------------------------------- shapes


class ShapesSpec(DatasetSpec):
    """The generated shapes (:func:`trainables.shapes.make_shapes`): ``num_train`` / ``num_test`` images
    of ``image_size`` px, seeds ``seed`` (train) and ``seed + 1`` (test)."""

    name = "shapes"
    num_classes = len(SHAPES_CLASSES)
    mean_std = ((0.45, 0.45, 0.45), (0.25, 0.25, 0.25))
    in_memory = True

    def class_names(self) -> list[str]:
        return list(SHAPES_CLASSES)

    def arrays(self, data, train):
        data = as_data_config(data)
        n = data.num_train if train else data.num_test
        seed = data.seed if train else data.seed + 1
        d = make_shapes(n, data.image_size, seed)
        return d.images, d.labels

    def source(self, data):
        data = as_data_config(data)
        return "code", {"generator": "trainables.shapes.make_shapes", "seed": data.seed, "image_size": data.image_size}

    def summary_lines(self, data):
        return super().summary_lines(data) + [
            f"  {category} concepts: {', '.join(CONCEPTS[category])}" for category in CATEGORIES
        ]

    def concept_classes(self):
        """A class is (shape, texture): its images contain that shape and that texture."""
        return {c: [i for i, name in enumerate(SHAPES_CLASSES) if c in name.split("/")] for c in (*SHAPES, *TEXTURES)}


@contextlib.contextmanager
def opened_image(path: Path, what: str):
    """``PIL.Image.open(path)``, fully decoded; a missing, truncated or non-image file is one
    :class:`DataError` naming it (``what``: "Places365 image", "Broden mask", ...)."""
    from PIL import Image

    if not path.is_file():
        raise DataError(f"{what} {path} is missing")
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{what} {path} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                        ) from None
    with im:
        yield im


def check_image(path: Path, what: str) -> None:
    """A :class:`DataError` naming ``path`` when it is missing, truncated or not an image."""
    with opened_image(path, what):
        pass


# --------------------------------------------------------------------------- CIFAR-100


@contextlib.contextmanager
def download_lock(root: Path):
    """Hold ``root/.download.lock`` (an exclusive ``flock``): one download and extraction into ``root`` at a time.

    Every Train worker on a node (DDP ranks, trials side by side) that is allowed
    to download calls torchvision's download into the same ``data.root``; under
    this lock the first one fetches and extracts while the others wait, and then
    find the files whole (torchvision's checksums) and fetch nothing. A process
    killed while holding it releases it (the kernel drops the lock with its file
    descriptor); what it left half-written fails its checksum and is fetched anew.
    """
    import fcntl

    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / ".download.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise DataError(f"cannot download into data.root = {root} ({exc.strerror}); choose a writable directory"
                        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def load_cifar100(root: str | Path, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-100 as ((N, 3, 32, 32) uint8, (N,) int64) through torchvision's ``CIFAR100``.

    With ``download``, the download and extraction run under :func:`download_lock`
    (the loading itself does not): a node fetches the archive once, however many
    workers ask for it.
    """
    from torchvision.datasets import CIFAR100

    class LockedCIFAR100(CIFAR100):
        def download(self) -> None:
            with download_lock(Path(self.root)):
                super().download()

    root = Path(root)
    if not download and not (root / CIFAR100.base_folder).is_dir():
        raise DataError(_download_hint("CIFAR-100", root, f"{CIFAR100.base_folder}/"))
    try:
        ds = LockedCIFAR100(str(root), train=train, download=download)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # IncompleteRead: a cut download
        raise DataError(f"could not download CIFAR-100 to {root}: {getattr(exc, 'reason', exc)}") from None
    except RuntimeError:
        archive = root / CIFAR100.filename
        if download and archive.is_file() and not _intact(archive, CIFAR100.tgz_md5):
            raise DataError(
                f"the CIFAR-100 archive downloaded to {archive} does not match its checksum (an interrupted or "
                "altered download); run again to fetch it anew"
            ) from None
        raise DataError(
            f"CIFAR-100 under {root} is incomplete or corrupted; delete {root / CIFAR100.base_folder} and "
            "download it again"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)


def _intact(path: Path, md5: str) -> bool:
    from torchvision.datasets.utils import check_integrity

    return check_integrity(str(path), md5)


class Cifar100Spec(DatasetSpec):
    """torchvision ``CIFAR100`` under ``data.root``, held in memory (32 px)."""

    name = "cifar100"
    num_classes = 100
    mean_std = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    in_memory = True

    def check_present(self, data):
        """The folder is there and every file matches torchvision's checksum: a truncated or damaged
        file is one line here, on the driver, not a worker's traceback (about 0.5 s for the 160 MB)."""
        from torchvision.datasets import CIFAR100
        from torchvision.datasets.utils import check_integrity

        data = as_data_config(data)
        folder = Path(data.root) / CIFAR100.base_folder
        if not folder.is_dir():
            if not data.download:
                raise DataError(_download_hint("CIFAR-100", Path(data.root), f"{CIFAR100.base_folder}/"))
            return  # the worker downloads it
        for name, md5 in [*CIFAR100.train_list, *CIFAR100.test_list, (CIFAR100.meta["filename"], CIFAR100.meta["md5"])]:
            path = folder / name
            if not path.is_file():
                raise DataError(f"CIFAR-100 under {data.root} is incomplete: {path} is missing; delete {folder} "
                                "and download it again (data.download=true)")
            if not check_integrity(str(path), md5):
                raise DataError(f"CIFAR-100 under {data.root} is damaged: {path} does not match its checksum "
                                f"(truncated or altered); delete {folder} and download it again (data.download=true)")

    def arrays(self, data, train):
        data = as_data_config(data)
        return load_cifar100(data.root, train, data.download)


# --------------------------------------------------------------------------- Places365


def places365_dataset(
    root: str | Path, train: bool, download: bool = False, image_size: int = 224, augment: bool = True
):
    """torchvision ``Places365`` (small 256 px images) with the usual ImageNet-style transforms."""
    from torchvision import transforms as T
    from torchvision.datasets import Places365

    class LockedPlaces365(Places365):  # one download per node (download_lock), as for CIFAR-100
        def download_devkit(self) -> None:
            with download_lock(Path(self.root)):
                super().download_devkit()

        def download_images(self) -> None:
            with download_lock(Path(self.root)):
                super().download_images()

    root = Path(root)
    split = "train-standard" if train else "val"
    listing = Places365._FILE_LIST_META[split][0]
    if not download and not (root / Places365._CATEGORIES_META[0]).is_file():
        raise DataError(_download_hint("Places365", root, f"{Places365._CATEGORIES_META[0]}, {listing} and the images"))
    mean, std = Places365Spec.mean_std
    resize = round(image_size * 256 / 224)
    if train and augment:
        tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    else:
        tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])
    try:
        ds = LockedPlaces365(str(root), split=split, small=True, download=download, transform=tf)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DataError(f"could not download Places365 to {root}: {getattr(exc, 'reason', exc)}") from None
    except RuntimeError as exc:
        raise DataError(f"Places365 under {root} is incomplete: {str(exc).split('. ')[0]}") from None
    if len(ds) and not Path(ds.imgs[0][0]).is_file():
        raise DataError(f"Places365 under {root} lists images that are missing (first: {ds.imgs[0][0]})")
    return ds


class Places365Spec(DatasetSpec):
    """torchvision ``Places365`` (small) under ``data.root``, streamed at ``data.image_size`` px;
    its official val split is the kit's test split (the test labels are not public)."""

    name = "places365"
    num_classes = 365
    mean_std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    in_memory = False
    test_split = "val"

    def check_present(self, data):
        """The category file is there, each split's listing is readable, and its first image decodes
        (checking every one of 1.8M images up front would take too long; a damaged one met later fails
        its worker with the file's name)."""
        from torchvision.datasets import Places365

        data = as_data_config(data)
        root = Path(data.root)
        if not (root / Places365._CATEGORIES_META[0]).is_file():
            if not data.download:
                raise DataError(_download_hint("Places365", root, f"{Places365._CATEGORIES_META[0]} and the images"))
            return
        for split, images in (("train-standard", "data_256_standard"), ("val", "val_256")):
            listing = root / Places365._FILE_LIST_META[split][0]
            if not listing.is_file():
                continue  # torchvision's own check names it, in the worker that needs the split
            try:
                first = listing.read_text().split("\n", 1)[0].split()[0]
            except (OSError, UnicodeDecodeError, IndexError):
                raise DataError(f"Places365 listing {listing} is damaged or empty; download it again") from None
            check_image(root / images / first.lstrip("/"), "Places365 image")

    def dataset(self, data, train, augment):
        data = as_data_config(data)
        return places365_dataset(data.root, train, data.download, data.image_size, augment)


# --------------------------------------------------------------------------- registry

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (ShapesSpec(), Cifar100Spec(), Places365Spec())}

# Derived views, kept for the code that indexes them by name.
NUM_CLASSES: dict[str, int] = {name: spec.num_classes for name, spec in DATASETS.items()}
MEAN_STD: dict[str, MeanStd] = {name: spec.mean_std for name, spec in DATASETS.items()}


def dataset_spec(name: str) -> DatasetSpec:
    """The registered spec of dataset ``name``; a :class:`ConfigError` naming the known ones otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None
