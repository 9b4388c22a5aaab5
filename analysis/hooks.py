"""Retain and edit named layers' outputs inside context managers.

After davidbau/dissect ``netdissect/nethook.py``: layers are addressed by name
(:func:`trainables.models.resolve_layer`, which lists the valid names when one
is wrong), hooks are ``register_forward_hook`` handles kept by the context
manager and removed in ``__exit__`` (also on an exception), so the model is
unchanged afterwards. Every name is checked before any hook is registered: a
bad name leaves the model untouched.

Two kinds of name appear in this project:

* a *module* name (``conv5_3``, ``relu5_3``, ``pool5``): what :func:`retain_layers`
  and :func:`edit_layers` hook, literally that module's output;
* a *unit layer* name, as in Network Dissection: ``conv5_3`` means the units'
  activations after their ReLU (``relu5_3``; with BatchNorm ``conv -> bn -> relu``,
  still ``relu5_3``). :func:`unit_layer` maps a unit layer to the module whose
  output carries the units; explicit module names (``relu5_3``, ``bn5_3``,
  ``pool4``) map to themselves. Ablation and intervention use unit layers.

Rules given to :func:`edit_layers` must return a new tensor and leave their
input alone (the previous module's output may be retained elsewhere);
:func:`zero_units` and :func:`scale_units` do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from trainables.errors import ConfigError
from trainables.models import check_layer_name, model_layer_names, resolve_layer

__all__ = [
    "check_units",
    "edit_layer",
    "edit_layers",
    "eval_mode",
    "flat_children",
    "num_units",
    "retain_layers",
    "scale_units",
    "unit_conv",
    "unit_layer",
    "zero_units",
]

Rule = Callable[[torch.Tensor], torch.Tensor]


def _resolve_all(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """Resolve every name first (LayerNameError on the first bad one), so nothing is half-registered."""
    return [resolve_layer(model, name) for name in names]


@contextmanager
def retain_layers(model: nn.Module, names: str | Sequence[str], *, detach: bool = True) -> Iterator[dict]:
    """Keep the latest output of each named module in a dict while the block runs.

    ``with retain_layers(model, ["relu5_3"]) as acts: model(x)`` leaves the
    (B, C, H, W) output in ``acts["relu5_3"]``; the dict stays readable after
    the block, the hooks are gone.
    """
    names = [names] if isinstance(names, str) else list(names)
    retained: dict[str, torch.Tensor] = {}
    modules = _resolve_all(model, names)
    handles = []
    try:
        for name, module in zip(names, modules):

            def hook(_m, _inp, out, name=name):
                retained[name] = out.detach() if detach else out

            handles.append(module.register_forward_hook(hook))
        yield retained
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_layers(model: nn.Module, rules: Mapping[str, Rule]) -> Iterator[None]:
    """Replace each named module's output by ``rule(output)`` while the block runs."""
    modules = _resolve_all(model, list(rules))
    handles = []
    try:
        for module, rule in zip(modules, rules.values()):
            handles.append(module.register_forward_hook(lambda _m, _inp, out, rule=rule: rule(out)))
        yield
    finally:
        for h in handles:
            h.remove()


def edit_layer(model: nn.Module, name: str, rule: Rule):
    """:func:`edit_layers` for one module: ``with edit_layer(model, "relu5_3", zero_units([7])): ...``."""
    return edit_layers(model, {name: rule})


def _channel_index(units: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(units, dtype=torch.long).reshape(-1)


def zero_units(units: Sequence[int] | torch.Tensor) -> Rule:
    """A rule setting channels ``units`` (dim 1) to zero, out of place."""
    index = _channel_index(units)

    def rule(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, index.to(out.device)] = 0
        return out

    return rule


def scale_units(units: Sequence[int] | torch.Tensor, factor: float) -> Rule:
    """A rule multiplying channels ``units`` (dim 1) by ``factor``, out of place."""
    index = _channel_index(units)

    def rule(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        i = index.to(out.device)
        out[:, i] = out[:, i] * factor
        return out

    return rule


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


# --------------------------------------------------------------------------- unit layers


def flat_children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of a flat named ``nn.Sequential`` (what ``trainables.models.vgg16`` builds)."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"unit analysis needs the flat named nn.Sequential from trainables.models.vgg16, got a "
            f"{type(model).__name__} (unwrap DDP with model.module)"
        )
    return list(model.named_children())


def unit_layer(model: nn.Module, layer: str) -> str:
    """Name of the module whose output carries ``layer``'s units.

    A conv name means its activations after the ReLU that follows it (``conv5_3``
    -> ``relu5_3``, past a BatchNorm if any); any other child name (``relu5_3``,
    ``bn5_3``, ``pool4``, ``relu6``) is taken literally.
    """
    children = flat_children(model)
    names = [n for n, _ in children]
    if layer not in names:
        check_layer_name(layer, model_layer_names(model))  # unknown: lists the valid names
        raise ConfigError(f"'{layer}' is nested inside another module; address a top-level layer of the flat VGG-16")
    i = names.index(layer)
    if not isinstance(children[i][1], nn.Conv2d):
        return layer
    for name, module in children[i + 1 :]:
        if isinstance(module, nn.ReLU):
            return name
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            break
    raise ConfigError(f"no ReLU follows '{layer}' before the next conv/linear layer; address a module explicitly")


def _producer(model: nn.Module, site: str, kinds: tuple[type, ...]) -> nn.Module | None:
    """The last module of one of ``kinds`` at or before ``site`` in forward order."""
    children = flat_children(model)
    names = [n for n, _ in children]
    for _name, module in reversed(children[: names.index(site) + 1]):
        if isinstance(module, kinds):
            return module
    return None


def num_units(model: nn.Module, layer: str) -> int:
    """Channels of ``layer``'s output (the units an ablation addresses)."""
    site = unit_layer(model, layer)
    module = _producer(model, site, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))
    if module is None:
        raise ConfigError(f"cannot tell how many units '{layer}' has: no conv, BN or linear layer feeds it")
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    return module.out_features


def unit_conv(model: nn.Module, layer: str) -> tuple[str, nn.Conv2d]:
    """(name, module) of the conv whose output channels are ``layer``'s units."""
    site = unit_layer(model, layer)
    children = flat_children(model)
    names = [n for n, _ in children]
    for name, module in reversed(children[: names.index(site) + 1]):
        if isinstance(module, nn.Conv2d):
            return name, module
        if isinstance(module, nn.Linear):
            break
    raise ConfigError(f"'{layer}' is not fed by a conv layer, so it has no conv weights to modify")


def check_units(model: nn.Module, layer: str, units: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """``units`` as a 1-D int64 CPU tensor (all units when None); ConfigError if out of range or repeated."""
    n = num_units(model, layer)
    if units is None:
        return torch.arange(n)
    index = torch.as_tensor(units).reshape(-1)
    if index.numel() and (index.is_floating_point() or index.is_complex()):
        raise ConfigError(f"unit indices must be integers, got {units!r}")
    index = index.to(torch.long).cpu()
    bad = index[(index < 0) | (index >= n)]
    if bad.numel():
        raise ConfigError(f"unit {int(bad[0])} is out of range: '{layer}' has {n} units (0..{n - 1})")
    if index.unique().numel() != index.numel():
        raise ConfigError(f"unit indices for '{layer}' repeat; give each unit once")
    return index
