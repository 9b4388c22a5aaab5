"""The typed configuration sections that workers read: one pydantic model per section.

Defaults live here and in ``study.config`` (the driver-only sections: sweep,
tracking, ray) and nowhere else. The driver validates the whole
``study.config.StudyConfig`` once; what it sends to a Ray worker is that model's
JSON dump, which the worker rebuilds once into a :class:`WorkerConfig` (these
sections, typed) and reads as attributes from then on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainables.errors import ConfigError

__all__ = [
    "AblationConfig", "DataConfig", "DissectionConfig", "DropoutConfig", "FocusedDropoutConfig",
    "GradientPenaltyConfig", "ModelConfig", "RegularizationConfig", "Section", "TrainConfig", "WorkerConfig",
    "WorkerSections",
    "as_section",
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class DataConfig(Section):
    name: Literal["shapes", "cifar100", "places365"] = "shapes"  # which dataset
    root: str = "data"  # where cifar100 / places365 live (or are downloaded to)
    download: bool = False  # allow torchvision to download a missing dataset
    image_size: int = Field(32, ge=8, le=1024)  # side in px (shapes generates at this size)
    num_train: int = Field(10_000, ge=1)  # shapes: generated training images
    num_test: int = Field(2_000, ge=1)  # shapes: generated test images
    seed: int = 0  # shapes: generation seed (train and test use seed and seed + 1); seed of the train/val split
    val_fraction: float = Field(0.1, ge=0, lt=1)  # share of train held out (class-stratified) for every choice; 0 = none
    augment: bool = True  # random crop (pad crop_padding) + horizontal flip on train batches
    crop_padding: int = Field(4, ge=0, le=64)  # zero padding before the random crop
    loader_workers: int = Field(4, ge=0, le=64)  # DataLoader workers (places365 path only)


class ModelConfig(Section):
    variant: Literal["cifar", "places365"] = "cifar"  # 32 px / 512 head, or 224 px / 4096 head
    batch_norm: bool = True  # vgg16_bn when true
    width: float = Field(1.0, gt=0, le=8)  # channel multiplier; 1.0 = the paper
    num_classes: int | None = Field(None, ge=2)  # default: the dataset's class count


class FocusedDropoutConfig(Section):
    par_rate: float = Field(0.0, ge=0, le=1)  # share of mini-batches that get FocusedDropout; 0 = off
    gamma: tuple[float, float] = (0.6, 0.9)  # threshold ratio drawn per image from U(lo, hi)
    site: str = "pool4"  # layer after which FocusedDropout is applied (output of block 4)

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0 < lo <= hi < 1):
            raise ValueError("gamma_range")
        return v


class DropoutConfig(Section):
    rate: float = Field(0.0, ge=0, lt=1)  # dropout probability at the head's sites drop6, drop7


class GradientPenaltyConfig(Section):
    lam: float = Field(0.0, ge=0, alias="lambda")  # weight of the input-gradient penalty; 0 = off
    method: Literal["double_backprop", "finite_difference"] = "double_backprop"
    h: float = Field(0.01, gt=0, le=1)  # finite-difference step (finite_difference method only)
    every: int = Field(1, ge=1)  # lazy regularization: the penalty on every k-th step, weighted k (1 = the paper)


class RegularizationConfig(Section):
    focused_dropout: FocusedDropoutConfig = Field(default_factory=FocusedDropoutConfig)
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)
    gradient_penalty: GradientPenaltyConfig = Field(default_factory=GradientPenaltyConfig)


class TrainConfig(Section):
    epochs: int = Field(150, ge=1)
    batch_size: int = Field(128, ge=1)  # per step, summed over all workers
    lr: float = Field(0.01, gt=0, le=10)  # SGD learning rate
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    t_max: int = Field(200, ge=1)  # CosineAnnealingLR period in epochs
    num_workers: int = Field(1, ge=1, le=1024)  # Ray Train workers (DDP ranks)
    cpus_per_worker: int = Field(1, ge=1, le=256)  # CPUs each worker reserves; on CPU also its torch threads
    use_gpu: bool = False
    # GPUs each worker reserves when use_gpu: a share in (0, 1] packs several trials on one GPU (0.25: four),
    # a whole number gives a worker several; ignored on CPU. Ray assigns a share < 1 within one GPU.
    gpus_per_worker: float = Field(1.0, ge=0.0001, le=64)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU, off on CPU
    # torch.compile the model for training and evaluation; auto = on for CUDA unless the exact
    # (double_backprop) penalty is on, which torch.compile cannot differentiate twice
    compile: Literal["auto", "on", "off"] = "auto"
    sync_batchnorm: bool = False  # convert BatchNorm to SyncBatchNorm under DDP
    seed: int = 0
    # Test images evaluated after every epoch but the last: the first N of the test split (None: all of it).
    # The last epoch always evaluates the whole test split, so a large test set for the analyses costs one pass.
    test_images_per_epoch: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0, le=100)  # worker failures Ray Train recovers from
    fail_at_epoch: int | None = Field(None, ge=0)  # fault injection (tests): last worker dies once here

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_or_share(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"{v:g} is neither a share of one GPU in (0, 1] nor a whole number of GPUs "
                             "(Ray assigns GPUs whole, or a share of one); use e.g. 0.5, 1 or 2")
        return v


class AblationConfig(Section):
    layer: str = "conv5_3"  # units = channels of this layer, taken after its ReLU
    units: list[int] | None = None  # default: every unit of the layer
    unit_chunk: int = Field(64, ge=1)  # units per Ray task
    num_gpus: float = Field(0.25, ge=0, le=1)  # GPU share per task (0 on CPU clusters)
    max_retries: int = Field(3, ge=0)
    dtype: Literal["float32", "float64"] = "float32"  # float64: counts equal the naive loop's even on near-ties
    precision_sample: int = Field(64, ge=0)  # float32 only: images re-checked in float64 (0 = no check)
    top_k: int = Field(5, ge=1)  # worst/best units for interventions
    factors: list[float] = [2.0, 3.0]  # divide / multiply factors tried in order


class DissectionConfig(Section):
    layer: str = "conv5_3"
    concepts: Literal["shapes", "broden"] = "shapes"
    broden_root: str | None = None  # Broden-format directory (concepts = broden)
    quantile: float = Field(0.01, gt=0, le=0.5)  # top quantile defining t_u (paper 0.01)
    iou_threshold: float = Field(0.04, ge=0, le=1)  # a unit is a detector at IoU >= this
    num_images: int = Field(1_000, ge=1)
    top_images: int = Field(5, ge=1)  # per unit in Figure 3
    image_size: int | None = Field(None, ge=8, le=1024)  # shapes concepts: px of the dissection images (default data.image_size)
    # Dissect images of another size than the model was trained on (refused otherwise: the labels would describe
    # a regime the model never runs in); the run is tagged other_image_size.
    allow_other_size: bool = False
    # Which reference's semantics (README "Network dissection"); None = the concept source's default:
    # broden -> NetDissect-Lite's (per_category, raw, the paper's four categories), shapes -> (dataset, upsampled, all)
    denominator: Literal["per_category", "dataset"] | None = None  # a unit's area per concept category, or overall
    threshold_on: Literal["raw", "upsampled"] | None = None  # t_u from the raw feature maps or the upsampled ones
    categories: list[str] | None = None  # broden category columns (None: object, part, material, color)
    seed: int = 0  # broden: the seed of the image sample when num_images is below the split's size
    split: Literal["all", "train", "val"] | None = None  # broden index.csv rows (None: all, as NetDissect-Lite)
    # Exact thresholds by each unit's top values (top_k) or a two-level radix histogram (bounded memory);
    # auto: top_k when its values fit in 1 GiB per task, else histogram. Both give the same t_u.
    threshold_method: Literal["auto", "top_k", "histogram"] = "auto"


class WorkerSections(Section):
    """The sections workers read; :class:`study.config.StudyConfig` adds the driver's (sweep, tracking, ray)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ablation: AblationConfig = Field(default_factory=AblationConfig)
    dissection: DissectionConfig = Field(default_factory=DissectionConfig)


class WorkerConfig(WorkerSections):
    """The sections a worker reads, rebuilt once from the driver's validated dump (other sections ignored)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    num_classes: int | None = None  # the driver's resolved class count (model.num_classes or the dataset's)

    @classmethod
    def from_dump(cls, dump: dict[str, Any], num_classes: int | None = None) -> WorkerConfig:
        return cls.model_validate({**dump, "num_classes": num_classes})


def as_section(cls: type[Section], value: Any) -> Section:
    """``value`` as the typed section ``cls``: returned as is when it already is one, else validated once.

    The boundary where a plain dict (a ``StudyConfig.dump()`` part, a test's
    literal) becomes typed; everything past it reads attributes.
    """
    if isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{cls.__name__}: {where} = {err.get('input')!r} is invalid: {err['msg']}") from None
