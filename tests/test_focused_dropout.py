"""FocusedDropout (PAPER.md section 3, Algorithm 1) against a plain-Python reading of the algorithm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainables.errors import ConfigError
from trainables.focused_dropout import FocusedDropout, focused_dropout, focused_dropout_mask
from trainables.models import vgg16
from trainables.regularizers import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def algorithm1_mask(image: list[list[float]], gamma: float) -> list[float]:
    """Algorithm 1 for one image given as C channels of S positions: the spatial 0/1 mask."""
    means = [sum(channel) / len(channel) for channel in image]
    k = means.index(max(means))  # first channel with the highest mean
    m_max = max(image[k])
    return [1.0 if value > gamma * m_max else 0.0 for value in image[k]]


def reference_output(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x * mask`` with the mask from :func:`algorithm1_mask`, image by image, no rescaling."""
    out = []
    for image in x.double().flatten(2).tolist():  # B x C x S
        mask = algorithm1_mask(image, gamma)
        out.append([[v * m for v, m in zip(channel, mask)] for channel in image])
    return torch.tensor(out, dtype=torch.float64).view(x.shape)


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (1, 1, 1, 1), (3, 2, 9), (2, 5, 2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.6, 0.75, 0.9])
def test_mask_matches_plain_python_algorithm_1_for_fixed_gamma(shape, dtype, gamma):
    g = torch.Generator().manual_seed(hash((shape, gamma)) % 2**31)
    x = torch.randn(shape, generator=g, dtype=dtype).relu() + 0.1 * torch.randn(shape, generator=g, dtype=dtype)
    out = focused_dropout(x, gamma, gamma)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out.double(), reference_output(x, gamma))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_equal_to_the_threshold_are_dropped(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 5, (6, 3, 4, 4), generator=g) / 4).to(dtype)  # levels 0, .25, .5, .75, 1: ties
    assert torch.equal(focused_dropout(x, 0.75, 0.75).double(), reference_output(x, 0.75))


def test_mask_is_one_spatial_mask_shared_by_all_channels():
    x = torch.rand(3, 8, 6, 6)
    mask = focused_dropout_mask(x, 0.7, 0.7)  # (B, 1, H, W)
    assert mask.shape == (3, 1, 6, 6)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(focused_dropout(x, 0.7, 0.7), x * mask)


def test_gamma_is_drawn_per_image_from_its_range():
    lo, hi = 0.2, 0.8
    ramp = torch.linspace(0.01, 1.0, 400).view(1, 20, 20)  # distinct levels: each gamma cuts differently
    x = torch.cat([ramp * 2, ramp * 0.5]).expand(32, 2, 20, 20).contiguous()  # 32 identical images
    mask = focused_dropout_mask(x, lo, hi, torch.Generator().manual_seed(0)).view(32, 400)
    focus = x[:, 0].reshape(32, 400)  # channel 0 has the highest mean
    m_max = focus.amax(1)
    for keep, values, top in zip(mask.bool(), focus, m_max):
        cut = values[keep].min()  # every kept value lies above a single threshold in [lo, hi] * max
        assert torch.equal(keep, values >= cut)
        assert cut > lo * top
        assert values[~keep].max() <= hi * top
    assert len(set(mask.sum(1).tolist())) > 8  # the images of one batch are cut at different levels


def test_focused_dropout_is_identity_in_eval():
    module = FocusedDropout(par_rate=1.0).eval()
    x = torch.rand(2, 3, 4, 4)
    assert module(x) is x


def test_focused_dropout_is_identity_at_par_rate_zero():
    module = FocusedDropout(par_rate=0.0).train()
    x = torch.rand(2, 3, 4, 4)
    assert module(x) is x


def test_par_rate_one_applies_to_every_training_batch():
    module = FocusedDropout(par_rate=1.0, gamma=(0.5, 0.5)).train()
    for _ in range(20):
        x = torch.rand(2, 3, 4, 4)
        assert torch.equal(module(x), reference_output(x, 0.5).float())


def _participated(module: FocusedDropout, batches: int) -> list[bool]:
    x = torch.rand(2, 3, 5, 5) + 0.1  # positive: every participating batch loses positions
    return [not torch.equal(module(x), x) for _ in range(batches)]


@pytest.mark.parametrize("par_rate", [0.1, 0.5, 0.9])
def test_share_of_participating_batches_matches_par_rate(par_rate):
    n = 1000
    hits = sum(_participated(FocusedDropout(par_rate, seed=7).train(), n))
    sigma = math.sqrt(n * par_rate * (1 - par_rate))
    assert abs(hits - n * par_rate) <= 4 * sigma


def test_same_seed_repeats_participation_and_masks_other_seed_does_not():
    x = torch.rand(4, 3, 6, 6)
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        module = FocusedDropout(0.5, seed=seed).train()
        runs[name] = torch.stack([module(x) for _ in range(30)])
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"])


def test_gradient_flows_through_kept_positions_only():
    x = torch.rand(3, 4, 5, 5, requires_grad=True)
    mask = focused_dropout_mask(x, 0.6, 0.6)
    focused_dropout(x, 0.6, 0.6).sum().backward()
    assert torch.equal(x.grad, mask.expand_as(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_keeps_dtype_and_thresholds_exact_values(dtype):
    x = torch.rand(3, 5, 6, 6).to(dtype)
    out = focused_dropout(x, 0.7, 0.7)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out.double(), reference_output(x, 0.7))


def test_shape_and_dtype_preserved_under_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), FocusedDropout(1.0, gamma=(0.8, 0.8))).train()
    x = torch.randn(2, 3, 7, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acts = net[1](net[0](x))
        out = net[2](acts)
    assert acts.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and out.shape == (2, 8, 7, 9)
    assert torch.equal(out.double(), reference_output(acts, 0.8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_under_autocast_matches_algorithm_1(dtype):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).cuda()
    module = FocusedDropout(1.0, gamma=(0.8, 0.8)).train()
    with torch.autocast("cuda", dtype=dtype):
        acts = net(torch.randn(4, 3, 8, 8, device="cuda"))
        out = module(acts)
    assert out.device == acts.device and out.dtype == dtype
    assert torch.equal(out.double().cpu(), reference_output(acts.cpu(), 0.8))


@pytest.mark.parametrize(
    "kwargs",
    [{"par_rate": -0.1}, {"par_rate": 1.5}, {"par_rate": 0.1, "gamma": (0.9, 0.6)},
     {"par_rate": 0.1, "gamma": (0.0, 0.5)}, {"par_rate": 0.1, "gamma": (0.5, 1.0)},
     {"par_rate": 0.1, "gamma": (0.5, 0.6, 0.7)}],
)
def test_bad_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        FocusedDropout(**kwargs)


def test_activations_without_spatial_dims_raise_config_error():
    with pytest.raises(ConfigError, match="spatial"):
        FocusedDropout(1.0).train()(torch.rand(4, 10))


def test_extra_repr_shows_settings():
    assert repr(FocusedDropout(0.1, (0.3, 0.6), seed=5)) == "FocusedDropout(par_rate=0.1, gamma=(0.3, 0.6), seed=5)"


def _cfg(par_rate: float, rate: float = 0.0, site: str = "pool4", num_classes: int | None = None) -> dict:
    return {
        "model": {"variant": "cifar", "batch_norm": True, "width": 0.0625, "num_classes": num_classes},
        "regularization": {
            "focused_dropout": {"par_rate": par_rate, "gamma": [0.6, 0.9], "site": site},
            "dropout": {"rate": rate},
            "gradient_penalty": {"lambda": 0.0, "method": "double_backprop", "h": 0.01},
        },
        "train": {"seed": 11},
    }


def test_build_model_places_focused_dropout_after_the_configured_site():
    model = build_model(_cfg(0.1, rate=0.2, site="relu5_3"), num_classes=20)
    names = [n for n, _ in model.named_children()]
    assert names[names.index("relu5_3") + 1] == "focused_dropout"
    fd = model.focused_dropout
    assert (fd.par_rate, fd.gamma, fd.seed) == (0.1, (0.6, 0.9), 11)
    assert model.drop6.p == model.drop7.p == 0.2
    assert model.fc8.out_features == 20
    plain = vgg16("cifar", width=0.0625, num_classes=20)
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints interchangeable
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 20)


def test_build_model_without_focused_dropout_at_par_rate_zero_and_config_classes_win():
    model = build_model(_cfg(0.0, num_classes=7), num_classes=20)
    assert "focused_dropout" not in dict(model.named_children())
    assert model.fc8.out_features == 7


def test_build_model_without_a_class_count_raises_config_error():
    with pytest.raises(ConfigError):
        build_model(_cfg(0.0))
