"""Dissection finds detectors that a network learned, on its own, from pixels.

A narrow VGG-16-BN is trained for a few seconds to name the shape kind of
`shapes` images (4 classes); dissected at 112 px (conv5_3 7x7) it must have
units whose thresholded maps follow one shape concept's masks with an IoU far
above what the areas alone give, while the same network before training has
none. Nothing here looks at a mask to compute a unit: the units are the
network's, the masks only score them.
"""

import pytest
import torch

from analysis.concepts import ShapesConcepts, concept_batches
from analysis.dissection import dissect_layer
from trainables.data import MEAN_STD, TEXTURES, DeviceLoader, make_shapes
from trainables.models import vgg16

pytestmark = pytest.mark.slow


def shape_iou(model) -> torch.Tensor:
    """(U,) each conv5_3 unit's best IoU with a shape concept, on 120 dissection images of 112 px, q = 0.05."""
    data = ShapesConcepts.generate(120, 112, seed=2)
    batches = concept_batches(data, torch.arange(data.num_images), batch_size=60, mean_std=MEAN_STD["shapes"])
    result = dissect_layer(model, "conv5_3", batches, data.concepts, device="cpu", quantile=0.05)
    shapes = torch.tensor([c == "shape" for c in data.concepts.categories])
    return result.counts.iou[:, shapes].max(1).values, result


@pytest.fixture(scope="module")
def networks():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: OpenMP spin-waits stall on a shared 2-core machine
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def _train():
    """(untrained, trained, trained test accuracy): 8 one-cycle epochs on 1,600 images, shape kind as label."""
    torch.manual_seed(0)
    untrained = vgg16("cifar", batch_norm=True, width=0.0625, num_classes=4)
    trained = vgg16("cifar", batch_norm=True, width=0.0625, num_classes=4)
    trained.load_state_dict(untrained.state_dict())
    d = make_shapes(1600, 32, seed=0)
    loader = DeviceLoader(d.images, d.labels // len(TEXTURES), batch_size=64, mean=MEAN_STD["shapes"][0],
                          std=MEAN_STD["shapes"][1], train=True, augment=True)
    epochs = 8
    opt = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=epochs * len(loader))
    trained.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(trained(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    test = make_shapes(300, 32, seed=1)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) * 255 for v in MEAN_STD["shapes"])
    with torch.no_grad():
        acc = (trained.eval()((test.images.float() - mean) / std).argmax(1) == test.labels // len(TEXTURES))
    return untrained.eval(), trained, acc.float().mean().item()


def test_a_network_trained_on_shapes_has_shape_detectors_that_its_untrained_self_lacks(networks):
    untrained, trained, accuracy = networks
    assert accuracy > 0.9, "the network learned the shapes"
    learned, result = shape_iou(trained)
    before, _ = shape_iou(untrained)
    units = result.units
    found = units[(units["category"] == "shape") & (units["iou"] >= 0.15) & (units["iou"] < 0.8 * units["ceiling"])]
    assert len(found) >= 3, f"shape detectors after training: {found[['unit', 'label', 'iou']].to_dict('records')}"
    assert learned.max() >= 0.3 and before.max() < 0.15, (learned.max(), before.max())
    assert (learned >= 0.15).sum() >= 3 and (before >= 0.15).sum() == 0
