"""Small random VGG-16s whose units matter, for the ablation and intervention tests.

A VGG-16 with plain random weights maps every input to nearly the same logits,
so ablating a unit changes no prediction and every equality test passes
vacuously. :func:`calibrated_vgg` normalises each layer on the test images
(data-dependent init: per-channel zero mean, unit variance, then a random shift
in [-1.5, 0.5]), so predictions vary across images, about a third of the
(conv5_3 unit, image) pairs are exactly zero after pool5 (the skip path runs)
and most single-unit ablations change some prediction.
"""

from __future__ import annotations

import torch
from torch import nn

from trainables.models import vgg16

NUM_CLASSES = 10


def images(n: int = 12, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def calibrated_vgg(
    x: torch.Tensor, variant: str = "cifar", batch_norm: bool = False, width: float = 0.0625, seed: int = 0
) -> nn.Sequential:
    """A random VGG-16 (eval mode) whose layers are normalised on ``x``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = vgg16(variant, batch_norm=batch_norm, width=width, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        h = x
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, module.in_features**-0.5, generator=g)
                module.bias.zero_()
            out = module(h)
            normalise = isinstance(module, (nn.Linear, nn.BatchNorm2d)) or (
                isinstance(module, nn.Conv2d) and not batch_norm
            )
            if normalise and name != "fc8":
                dims = [0] + list(range(2, out.dim()))
                shift = torch.empty(out.shape[1]).uniform_(-1.5, 0.5, generator=g)
                if isinstance(module, nn.BatchNorm2d):  # running statistics of its input
                    module.running_mean.copy_(h.mean(dims))
                    module.running_var.copy_(h.var(dims))
                    module.weight.uniform_(0.5, 1.5, generator=g)
                    module.bias.copy_(shift)
                else:
                    mean, std = out.mean(dims), out.std(dims) + 1e-3
                    module.weight.div_(std.view((-1,) + (1,) * (module.weight.dim() - 1)))
                    module.bias.sub_(mean).div_(std).add_(shift)
                out = module(h)
            h = out
    return model


def labelled_batches(model: nn.Module, x: torch.Tensor, sizes=(7, 5), seed: int = 2) -> list:
    """Uneven batches; half the labels are the model's predictions, so there is accuracy to lose."""
    with torch.no_grad():
        pred = model(x.to(next(model.parameters()).dtype)).argmax(1)
    y = torch.randint(0, NUM_CLASSES, (len(x),), generator=torch.Generator().manual_seed(seed))
    y[::2] = pred[::2]
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


def min_relative_margin(model: nn.Module, layer: str, batches: list, units=None) -> float:
    """The smallest gap between the two largest logits, over ``max |logit|``, of every image with no unit
    and with each unit of ``layer`` (``units``, default all) zeroed after its ReLU; float64, by hand.

    Two ways of computing the same logits (fast path and naive loop, two summation orders) differ by about
    1e-16 relative in float64 and 1e-6 in float32: where the margin is far above that, their predictions
    agree on any machine, so an equality of predictions there is no luck of this machine's kernels.
    """
    import copy

    work = copy.deepcopy(model).double().eval()
    relu = getattr(work, layer.replace("conv", "relu"))
    x = torch.cat([b[0] for b in batches]).double()
    n_units = work.get_submodule(layer).out_channels
    worst = float("inf")
    with torch.no_grad():
        for u in [None, *(range(n_units) if units is None else units)]:
            def zero(_m, _i, out, u=u):
                out = out.clone()
                if u is not None:
                    out[:, u] = 0
                return out

            handle = relu.register_forward_hook(zero)
            try:
                logits = work(x)
            finally:
                handle.remove()
            top = logits.topk(2, 1).values
            worst = min(worst, float(((top[:, 0] - top[:, 1]) / logits.abs().amax(1)).min()))
    return worst
