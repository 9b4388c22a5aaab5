"""Named-layer VGG-16: same function as torchvision's, names resolve, checkpoints load."""

import pytest
import torch
from torch import nn
from torchvision.models import vgg16 as tv_vgg16
from torchvision.models import vgg16_bn as tv_vgg16_bn

from trainables.checkpoint import checkpoint_dict, load_checkpoint, save_checkpoint
from trainables.errors import CheckpointError, LayerNameError
from trainables.models import (
    CONV_NAMES,
    infer_architecture,
    insert_after,
    layer_names,
    load_vgg16_state_dict,
    model_layer_names,
    resolve_layer,
    vgg16,
)


@pytest.fixture(scope="module")
def torchvision_pair():
    """torchvision vgg16 / vgg16_bn (random weights) and ours loaded from their state dicts."""
    torch.manual_seed(0)
    out = {}
    for bn, ctor in ((False, tv_vgg16), (True, tv_vgg16_bn)):
        ref = ctor(weights=None, num_classes=365).eval()
        if bn:  # non-trivial running statistics, so BN is really exercised
            for m in ref.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.data.uniform_(0.5, 1.5)
        ours = vgg16("places365", batch_norm=bn).eval()
        load_vgg16_state_dict(ours, ref.state_dict())
        out[bn] = (ref, ours)
    return out


@pytest.mark.parametrize("bn", [False, True])
def test_named_vgg16_computes_what_torchvision_computes(torchvision_pair, bn):
    ref, ours = torchvision_pair[bn]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bn, position", [(False, 28), (True, 40)])
def test_conv5_3_is_the_13th_conv_and_torchvisions_positional_layer(torchvision_pair, bn, position):
    ref, ours = torchvision_pair[bn]
    convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and resolve_layer(ours, "conv5_3") is convs[12]
    assert torch.equal(resolve_layer(ours, "conv5_3").weight, ref.features[position].weight)


def test_layer_names_list_matches_the_built_model():
    for variant in ("cifar", "places365"):
        for bn in (False, True):
            model = vgg16(variant, batch_norm=bn, width=0.125)
            assert model_layer_names(model) == layer_names(variant, bn)
    assert [n for n in layer_names("cifar", True) if n.startswith("conv")] == list(CONV_NAMES)


def test_cifar_variant_shapes_and_width():
    model = vgg16("cifar", batch_norm=True, width=0.25, num_classes=20)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 20)
    assert resolve_layer(model, "conv5_3").out_channels == 128
    assert resolve_layer(model, "fc6").in_features == 128 and resolve_layer(model, "fc7").out_features == 128
    full = vgg16("cifar", batch_norm=False)
    assert resolve_layer(full, "fc6").in_features == 512 and resolve_layer(full, "fc8").out_features == 100


def test_dropout_rate_reaches_the_head_sites():
    model = vgg16("cifar", width=0.125, dropout=0.2)
    assert resolve_layer(model, "drop6").p == 0.2 and resolve_layer(model, "drop7").p == 0.2


def test_unknown_layer_lists_valid_names():
    model = vgg16("cifar", width=0.125)
    with pytest.raises(LayerNameError) as info:
        resolve_layer(model, "conv5_4")
    assert "did you mean 'conv5_3'" in str(info.value) and "relu5_3" in str(info.value)


def test_insert_after_places_a_module_and_keeps_state_dict_keys():
    model = vgg16("cifar", width=0.125)
    marker = nn.Identity()
    new = insert_after(model, "pool4", "focused_dropout", marker)
    names = [n for n, _ in new.named_children()]
    assert names[names.index("pool4") + 1] == "focused_dropout"
    assert list(new.state_dict()) == list(model.state_dict())
    with pytest.raises(LayerNameError):
        insert_after(model, "pool9", "x", nn.Identity())


def test_places365_checkpoint_keys_in_every_spelling_load(torchvision_pair):
    ref, _ = torchvision_pair[False]
    sd = ref.state_dict()
    names = layer_names("places365", False)
    trunk = names[: names.index("pool5") + 1]
    head = ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8a"]
    dissect = {}
    for k, v in sd.items():
        part, index, rest = k.split(".", 2)
        name = (trunk if part == "features" else head)[int(index)]
        dissect[f"{part}.{name}.{rest}"] = v
    x = torch.randn(1, 3, 32, 32)
    expected = ref(x)
    for spelling in (
        {f"module.{k}": v for k, v in sd.items()},  # DataParallel
        {"state_dict": {f"module.{k}": v for k, v in sd.items()}},  # places365 .pth.tar style
        dissect,
    ):
        model = vgg16("places365", batch_norm=False).eval()
        load_vgg16_state_dict(model, spelling)
        with torch.no_grad():
            assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_class_count_or_architecture_is_refused():
    small = vgg16("cifar", width=0.125, num_classes=20)
    with pytest.raises(CheckpointError, match="fc8.weight"):
        load_vgg16_state_dict(vgg16("cifar", width=0.125, num_classes=10), small.state_dict())
    with pytest.raises(CheckpointError, match="missing"):
        load_vgg16_state_dict(vgg16("cifar", batch_norm=True, width=0.125), vgg16("cifar", batch_norm=False, width=0.125).state_dict())


def test_infer_architecture_reads_back_the_build_arguments():
    for variant, bn, width, classes in (("cifar", True, 0.25, 20), ("places365", False, 0.125, 365)):
        arch = infer_architecture(vgg16(variant, batch_norm=bn, width=width, num_classes=classes).state_dict())
        assert arch == {"variant": variant, "batch_norm": bn, "width": width, "num_classes": classes}
    for width in (0.1, 0.3, 0.7):  # widths whose rounded channel counts are not width * 64 exactly
        sd = vgg16("cifar", width=width, num_classes=20).state_dict()
        arch = infer_architecture(sd)
        load_vgg16_state_dict(vgg16("cifar", width=arch["width"], num_classes=20), sd)


def test_checkpoint_round_trip_under_weights_only(tmp_path):
    model = vgg16("cifar", width=0.125, num_classes=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    path = save_checkpoint(
        tmp_path / "ck" / "last.pt",
        checkpoint_dict(model, opt, sched, epoch=3, config={"train": {"epochs": 5}}, rng=torch.get_rng_state()),
    )
    ck = load_checkpoint(path)
    assert ck["epoch"] == 3 and ck["config"] == {"train": {"epochs": 5}}
    clone = vgg16("cifar", width=0.125, num_classes=20)
    load_vgg16_state_dict(clone, ck["model"])
    for a, b in zip(clone.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ck["optimizer"])
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["last.pt"], "no temporary file left behind"


def test_corrupt_or_missing_checkpoint_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
