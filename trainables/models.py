"""VGG-16 with research layer names.

The trunk comes from torchvision's ``make_layers(cfgs["D"], batch_norm=...)``
(Simonyan & Zisserman 2015, configuration D) and is re-wrapped as one flat
``nn.Sequential(OrderedDict(...))`` whose children carry the names used in the
paper and in Network Dissection (Bau et al. 2017)::

    conv1_1 [bn1_1] relu1_1 conv1_2 [bn1_2] relu1_2 pool1 ... conv5_3 [bn5_3] relu5_3 pool5
    [avgpool] flatten fc6 relu6 drop6 fc7 relu7 drop7 fc8

Positional names are a trap (conv5_3 is ``features.28`` in ``vgg16`` but
``features.40`` in ``vgg16_bn``), so everything in this project addresses layers
by these names through :func:`resolve_layer`.

Variants:

* ``cifar``: 32 px input; pool5 leaves 1x1, so the head is
  512 -> 512 -> 512 -> classes (times ``width``) with dropout after fc6 and fc7.
* ``places365``: torchvision's ``vgg16`` layout: 224 px input, adaptive 7x7
  average pool, 4096-wide head, 365 classes. :func:`load_vgg16_state_dict`
  reads torchvision-positional, ``module.``-prefixed (DataParallel) and
  dissect-renamed (``features.conv5_3.weight``, ``classifier.fc8a.weight``) keys.

``width`` scales every channel count and the head (1.0 = the paper); tests and
the quickstart use small widths.
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from trainables.errors import CheckpointError, LayerNameError

VARIANTS = ("cifar", "places365")
NUM_CLASSES = {"cifar": 100, "places365": 365}
CONV_NAMES = tuple(
    f"conv{block}_{i}" for block, n in enumerate((2, 2, 3, 3, 3), start=1) for i in range(1, n + 1)
)
# torchvision's classifier, position by position (VGG.classifier in vgg.py).
_HEAD_NAMES = ("fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8")


def scaled_width(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _trunk_names(batch_norm: bool) -> list[str]:
    """Names of make_layers(cfgs["D"]) children, in order."""
    names: list[str] = []
    block, index = 1, 0
    for v in cfgs["D"]:
        if v == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 0
        else:
            index += 1
            names.append(f"conv{block}_{index}")
            if batch_norm:
                names.append(f"bn{block}_{index}")
            names.append(f"relu{block}_{index}")
    return names


def layer_names(variant: str = "cifar", batch_norm: bool = True) -> list[str]:
    """Every addressable layer name of the model, in forward order (no model built)."""
    if variant not in VARIANTS:
        raise LayerNameError(f"unknown VGG-16 variant '{variant}'; choose one of {', '.join(VARIANTS)}")
    pre_head = ["avgpool", "flatten"] if variant == "places365" else ["flatten"]
    return _trunk_names(batch_norm) + pre_head + list(_HEAD_NAMES)


def check_layer_name(name: str, valid: list[str], what: str = "layer") -> None:
    """Raise LayerNameError naming the valid choices (and a close match) if ``name`` is not one."""
    if name in valid:
        return
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise LayerNameError(f"unknown {what} '{name}'{hint}; valid names: {', '.join(valid)}")


def vgg16(
    variant: str = "cifar",
    *,
    batch_norm: bool = True,
    width: float = 1.0,
    num_classes: int | None = None,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Build VGG-16 as one flat named ``nn.Sequential``.

    Args:
        variant: ``"cifar"`` (32 px, 512-wide head) or ``"places365"`` (224 px, 4096-wide head).
        batch_norm: insert BatchNorm2d after every conv (torchvision's ``vgg16_bn``).
        width: multiplier on every channel count and the head width (1.0 = the paper).
        num_classes: output classes; defaults to 100 (cifar) or 365 (places365).
        dropout: rate of the dropout sites drop6 and drop7 (0 keeps them as identities).
    """
    if variant not in VARIANTS:
        raise LayerNameError(f"unknown VGG-16 variant '{variant}'; choose one of {', '.join(VARIANTS)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    num_classes = NUM_CLASSES[variant] if num_classes is None else num_classes
    cfg = [v if v == "M" else scaled_width(v, width) for v in cfgs["D"]]
    trunk = make_layers(cfg, batch_norm=batch_norm)
    layers: list[tuple[str, nn.Module]] = []
    for name, module in zip(_trunk_names(batch_norm), trunk, strict=True):
        if isinstance(module, nn.ReLU):
            module = nn.ReLU()  # not in-place: hooks may retain the conv output
        layers.append((name, module))

    c5 = cfg[-2]
    if variant == "places365":
        hidden = scaled_width(4096, width)
        layers += [("avgpool", nn.AdaptiveAvgPool2d((7, 7))), ("flatten", nn.Flatten(1))]
        in_features = c5 * 7 * 7
    else:
        hidden = scaled_width(512, width)
        layers += [("flatten", nn.Flatten(1))]
        in_features = c5  # pool5 leaves 1x1 at 32 px
    layers += [
        ("fc6", nn.Linear(in_features, hidden)),
        ("relu6", nn.ReLU()),
        ("drop6", nn.Dropout(dropout)),
        ("fc7", nn.Linear(hidden, hidden)),
        ("relu7", nn.ReLU()),
        ("drop7", nn.Dropout(dropout)),
        ("fc8", nn.Linear(hidden, num_classes)),
    ]
    model = nn.Sequential(OrderedDict(layers))
    _init_weights(model, linear_std=0.01 if variant == "places365" else None)
    return model


def _init_weights(model: nn.Module, linear_std: float | None) -> None:
    """torchvision VGG's initialisation: kaiming fan-out convs; linears N(0, linear_std).

    The narrow cifar head keeps PyTorch's default Linear init (``linear_std=None``):
    N(0, 0.01) shrinks the signal by 0.01 * sqrt(width) per layer, which at 512
    (and far more at the test widths) starves the trunk of gradient.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


def model_layer_names(model: nn.Module) -> list[str]:
    """Addressable names of a built model (its named submodules, in order)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a LayerNameError listing valid names otherwise."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    check_layer_name(name, model_layer_names(model))
    raise AssertionError("unreachable")


def insert_after(model: nn.Sequential, site: str, name: str, module: nn.Module) -> nn.Sequential:
    """A new flat Sequential with ``module`` (called ``name``) right after layer ``site``.

    Parameters are shared with ``model``, and the inserted module appears in no
    state-dict key of the others, so checkpoints stay loadable either way.
    """
    names = [n for n, _ in model.named_children()]
    check_layer_name(site, names)
    if name in names:
        raise LayerNameError(f"the model already has a layer called '{name}'")
    layers: list[tuple[str, nn.Module]] = []
    for child_name, child in model.named_children():
        layers.append((child_name, child))
        if child_name == site:
            layers.append((name, module))
    return nn.Sequential(OrderedDict(layers))


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Read variant, batch_norm, width and num_classes back from a state dict in our naming."""
    try:
        conv1 = state_dict["conv1_1.weight"]
        fc6 = state_dict["fc6.weight"]
        fc8 = state_dict["fc8.weight"]
        c5 = state_dict["conv5_3.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"the checkpoint is not a VGG-16 state dict: it has no key {exc}") from None
    variant = "places365" if fc6.shape[1] == c5 * 49 and fc6.shape[1] != c5 else "cifar"
    # width: the first ratio (widest layer first) that reproduces every conv's channel count
    channels = [v for v in cfgs["D"] if v != "M"]
    found = [state_dict[f"{n}.weight"].shape[0] for n in CONV_NAMES if f"{n}.weight" in state_dict]
    width = conv1.shape[0] / 64
    for c, f in sorted(zip(channels, found), reverse=True):
        if all(scaled_width(v, f / c) == got for v, got in zip(channels, found)):
            width = f / c
            break
    return {
        "variant": variant,
        "batch_norm": "bn1_1.weight" in state_dict,
        "width": width,
        "num_classes": fc8.shape[0],
    }


_POSITIONAL = re.compile(r"^(features|classifier)\.(\d+)\.(.+)$")
_NAMED = re.compile(r"^(features|classifier)\.([a-z]+\d+(?:_\d+)?a?)\.(.+)$")


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], batch_norm: bool) -> dict[str, torch.Tensor]:
    """Rename torchvision / DataParallel / dissect keys to this module's names.

    Accepted spellings of the same tensor: ``features.28.weight`` (torchvision
    positional), ``module.features.28.weight`` (saved from DataParallel or DDP),
    ``features.conv5_3.weight`` and ``classifier.fc8a.weight`` (dissect's
    renamed VGG), and ``conv5_3.weight`` (ours). A wrapping ``{"state_dict": ...}``
    or ``{"model": ...}`` dict is unwrapped.
    """
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    trunk = _trunk_names(batch_norm)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key[len("module.") :] if key.startswith("module.") else key
        if m := _POSITIONAL.match(new):
            part, index, rest = m.group(1), int(m.group(2)), m.group(3)
            names = trunk if part == "features" else _HEAD_NAMES
            if index >= len(names):
                raise CheckpointError(
                    f"checkpoint key '{key}' has no counterpart in VGG-16 (batch_norm={batch_norm})"
                )
            new = f"{names[index]}.{rest}"
        elif m := _NAMED.match(new):
            name = "fc8" if m.group(2) == "fc8a" else m.group(2)
            new = f"{name}.{m.group(3)}"
        out[new] = value
    return out


def load_vgg16_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a (possibly foreign-named) VGG-16 state dict into ``model``, strictly.

    A checkpoint of another architecture, width or class count raises one
    CheckpointError naming the first mismatch.
    """
    batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    converted = convert_state_dict(state_dict, batch_norm)
    own = model.state_dict()
    missing = [k for k in own if k not in converted]
    unexpected = [k for k in converted if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise CheckpointError(f"the checkpoint does not match this VGG-16: {'; '.join(parts)}")
    for k, v in converted.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"the checkpoint does not match this VGG-16: '{k}' has shape {tuple(v.shape)}, "
                f"the model expects {tuple(own[k].shape)} (another width or class count?)"
            )
    model.load_state_dict(converted, strict=True)
