"""The input-gradient penalty (PAPER.md section 4) against independent definitions.

penalty = (1/B) sum_i ||grad_{x_i} sum_j l_j||^2 with l_j the cross-entropy of example j.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainables.errors import ConfigError
from trainables.focused_dropout import FocusedDropout
from trainables.gradient_penalty import input_gradient_penalty, penalized_forward
from trainables.models import vgg16
from trainables.regularizers import batch_loss

LAM = 0.3


pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(*extra: nn.Module, classes: int = 5) -> nn.Sequential:
    """(B, 3, 4, 4) -> (B, classes): conv, ReLU, max-pool, [extra], linear; float64."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), *extra, nn.Flatten(), nn.Linear(16, classes)]
    return nn.Sequential(*layers).double()


def batch(b: int = 3, shape: tuple[int, ...] = (3, 4, 4), classes: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (b,), generator=g)


def central_difference_grad(loss_of_x, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d loss_of_x / dx, one coordinate at a time, by central differences."""
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = eps
        gflat[j] = (loss_of_x((flat + e).view_as(x)) - loss_of_x((flat - e).view_as(x))) / (2 * eps)
    return grad


def summed_ce(model: nn.Module, y: torch.Tensor):
    return lambda x: F.cross_entropy(model(x), y, reduction="sum").item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def _no_grad_grad(model, x, y):
    return central_difference_grad(summed_ce(model, y), x)


def test_exact_penalty_equals_central_finite_difference_of_the_loss():
    model, (x, y) = small_net().eval(), batch()
    grad = _no_grad_grad(model, x, y)  # (B, 3, 4, 4): example i's gradient of its own loss
    expected = grad.flatten(1).pow(2).sum(1).mean()
    ce, penalty = input_gradient_penalty(model, x, y, "double_backprop")
    assert rel_err(penalty.detach(), expected) < 1e-3
    assert torch.allclose(ce, F.cross_entropy(model(x), y))


def test_exact_penalty_with_train_mode_batchnorm_differentiates_the_summed_loss():
    model, (x, y) = small_net(nn.BatchNorm2d(4).double()).train(), batch(b=4)
    grad = _no_grad_grad(model, x, y)  # the batch statistics couple the examples
    _, penalty = input_gradient_penalty(model, x, y, "double_backprop")
    assert rel_err(penalty.detach(), grad.flatten(1).pow(2).sum(1).mean()) < 1e-3


def linear_softmax_penalty(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed form: grad_x CE(W x + b, y) = W^T (softmax(W x + b) - onehot(y))."""
    p = torch.softmax(x @ w.T + b, dim=1)  # (B, K)
    g = (p - F.one_hot(y, w.shape[0]).to(p)) @ w  # (B, D)
    return g.pow(2).sum(1).mean()


def test_exact_penalty_and_its_parameter_gradient_match_closed_form_on_linear_softmax():
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    x, y = batch(b=5, shape=(6,), classes=4)
    _, penalty = input_gradient_penalty(model, x, y, "double_backprop")
    penalty.backward()
    w, b = model.weight.detach().requires_grad_(), model.bias.detach().requires_grad_()
    expected = linear_softmax_penalty(w, b, x, y)
    expected.backward()
    assert torch.allclose(penalty, expected, rtol=1e-12)
    assert torch.allclose(model.weight.grad, w.grad, rtol=1e-10)
    assert torch.allclose(model.bias.grad, b.grad, rtol=1e-10, atol=1e-14)


def _grads(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_finite_difference_penalty_approaches_exact_one_as_h_shrinks():
    model, (x, y) = small_net().eval(), batch(b=4)
    ce, exact = input_gradient_penalty(model, x, y, "double_backprop")
    exact_grads = _grads(model, ce + LAM * exact)
    value_err, grad_err = [], []
    for h in (1e-1, 1e-2, 1e-3, 1e-4):
        ce, approx = input_gradient_penalty(model, x, y, "finite_difference", h=h)
        value_err.append(abs(approx.item() - exact.item()) / exact.item())
        grad_err.append(rel_err(_grads(model, ce + LAM * approx), exact_grads))
    assert value_err == sorted(value_err, reverse=True) and value_err[-1] < 1e-3
    assert grad_err == sorted(grad_err, reverse=True) and grad_err[-1] < 1e-3


@pytest.mark.parametrize("stochastic", [nn.Dropout(0.5), FocusedDropout(1.0, gamma=(0.3, 0.9))], ids=repr)
def test_finite_difference_replays_the_random_masks_of_the_first_forward(stochastic):
    model, (x, y) = small_net(stochastic).train(), batch(b=4)
    torch.manual_seed(5)
    stochastic.generator.manual_seed(5) if isinstance(stochastic, FocusedDropout) else None
    _, exact = input_gradient_penalty(model, x, y, "double_backprop")
    torch.manual_seed(5)
    stochastic.generator.manual_seed(5) if isinstance(stochastic, FocusedDropout) else None
    _, approx = input_gradient_penalty(model, x, y, "finite_difference", h=1e-5)
    assert abs(approx.item() - exact.item()) / exact.item() < 1e-3


def test_penalty_leaves_parameter_gradients_to_the_callers_single_backward():
    model, (x, y) = small_net().train(), batch()
    for method in ("double_backprop", "finite_difference"):
        input_gradient_penalty(model, x, y, method)
        assert all(p.grad is None for p in model.parameters())


def _tiny_vgg(batch_norm: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return vgg16("cifar", batch_norm=batch_norm, width=0.0625, num_classes=10)


def _reg(lam: float, method: str = "double_backprop", h: float = 0.01) -> dict:
    return {
        "focused_dropout": {"par_rate": 0.0, "gamma": [0.6, 0.9], "site": "pool4"},
        "dropout": {"rate": 0.0},
        "gradient_penalty": {"lambda": lam, "method": method, "h": h},
    }


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("method", ["double_backprop", "finite_difference"])
def test_batch_loss_moves_batchnorm_running_stats_like_one_plain_forward(method, momentum):
    model = _tiny_vgg().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    plain = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        loss, _, _ = batch_loss(model, x, y, _reg(LAM, method))
        loss.backward()
        plain(x)
    for (name, got), want in zip(model.named_buffers(), plain.buffers()):
        assert torch.equal(got, want), name
    assert all(m.momentum == momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("method", ["double_backprop", "finite_difference"])
def test_batch_loss_is_cross_entropy_plus_lambda_times_penalty(method):
    model, (x, y) = small_net().eval(), batch()
    loss, logits, metrics = batch_loss(model, x, y, _reg(LAM, method))
    ce, penalty = input_gradient_penalty(model, x, y, method)
    assert torch.allclose(loss, ce + LAM * penalty)
    assert torch.equal(logits, model(x))
    assert {k: v.item() for k, v in metrics.items()} == pytest.approx({"ce": ce.item(), "penalty": penalty.item()})
    assert all(v.device == x.device and not v.requires_grad for v in metrics.values()), "no host sync, no graph"


def test_batch_loss_at_lambda_zero_is_plain_cross_entropy_without_penalty():
    model, (x, y) = small_net().eval(), batch()
    loss, logits, metrics = batch_loss(model, x, y, _reg(0.0))
    assert torch.equal(loss, F.cross_entropy(model(x), y))
    assert list(metrics) == ["ce"]


@pytest.mark.parametrize("method", ["double_backprop", "finite_difference"])
def test_lazy_penalty_is_k_times_lambda_on_every_kth_step_and_plain_cross_entropy_between(method):
    model, (x, y) = small_net().eval(), batch()
    ce, penalty = input_gradient_penalty(model, x, y, method)
    lazy = _reg(LAM, method)
    lazy["gradient_penalty"]["every"] = 4
    for step in range(9):
        loss, _, metrics = batch_loss(model, x, y, lazy, step=step)
        if step % 4 == 0:
            assert torch.allclose(loss, ce + 4 * LAM * penalty), step
            assert "penalty" in metrics
        else:
            assert torch.equal(loss, F.cross_entropy(model(x), y)) and list(metrics) == ["ce"], step


def test_an_epoch_penalises_the_steps_numbered_from_its_first_step(monkeypatch):
    """train_one_epoch's 5th sum counts penalised images: steps 0, 4, 8 of 0..9; 12, 16 of 10..19."""
    from trainables.loop import train_one_epoch

    model = small_net().float()
    xb, yb = batch(b=20)
    loader = [(xb[i : i + 2].float(), yb[i : i + 2]) for i in range(0, 20, 2)]  # 10 steps of 2 images
    reg = _reg(LAM)
    reg["gradient_penalty"]["every"] = 4
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cpu = torch.device("cpu")
    assert train_one_epoch(model, loader, opt, reg, None, None, cpu, first_step=0)[4].item() == 3 * 2
    assert train_one_epoch(model, loader, opt, reg, None, None, cpu, first_step=10)[4].item() == 2 * 2


def test_finite_difference_under_bf16_autocast_is_computed_in_float32():
    """Two bf16 losses h * ||g|| apart are below bf16's resolution; the step must run in float32 (equal to
    it to 1e-6 relative), where plain bf16 forwards give an estimate off by tens of percent."""
    torch.manual_seed(0)
    model = vgg16("cifar", batch_norm=True, width=0.0625, num_classes=10).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _, ce32, pen32 = penalized_forward(model, x, y, "finite_difference", 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, ce, pen = penalized_forward(model, x, y, "finite_difference", 0.01)
    assert logits.dtype == torch.float32
    assert rel_err(pen.detach(), pen32.detach()) < 1e-6 and rel_err(ce.detach(), ce32.detach()) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what it would be without the float32 step
        low = F.cross_entropy(model(x), y, reduction="none").float()
    assert rel_err(low.mean().detach(), ce32.detach()) > 1e-4, "bf16 really is coarser here"


def test_fp16_inner_gradient_is_loss_scaled_so_it_does_not_underflow():
    """Tiny first-layer weights make the input gradient ~1e-9: fp16's backward flushes it to zero unless
    the inner loss is scaled (PyTorch's AMP gradient-penalty recipe), which recovers float32's penalty."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    with torch.no_grad():
        model[0].weight.mul_(1e-5)
        model[2].weight.mul_(1e-2)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    _, _, exact = penalized_forward(model, x, y)
    with torch.autocast("cpu", dtype=torch.float16):
        _, _, unscaled = penalized_forward(model, x, y)
        _, _, scaled = penalized_forward(model, x, y, grad_scale=torch.tensor(2.0**16))
    assert unscaled.item() == 0.0, "without scaling the fp16 inner gradient underflows"
    assert rel_err(scaled.detach(), exact.detach()) < 0.05


def test_bad_penalty_settings_raise_config_error():
    model, (x, y) = small_net(), batch()
    with pytest.raises(ConfigError, match="method"):
        input_gradient_penalty(model, x, y, "triple_backprop")
    with pytest.raises(ConfigError, match="h"):
        input_gradient_penalty(model, x, y, "finite_difference", h=0.0)
    with pytest.raises(ConfigError, match="method"):
        batch_loss(model, x, y, _reg(LAM, "nope"))
    with pytest.raises(ConfigError, match="lambda"):
        batch_loss(model, x, y, _reg(-1.0))


# ----------------------------------------------------------------------------- DDP

METHODS = ("double_backprop", "finite_difference")
WORLD = 2


def _ddp_batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * WORLD, 3, 32, 32, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 10, (2 * WORLD,), generator=g)


def _penalty_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    params = model.module if isinstance(model, DistributedDataParallel) else model
    params.zero_grad()
    ce, penalty = input_gradient_penalty(model, x, y, method)
    (ce + LAM * penalty).backward()
    return {n: p.grad.clone() for n, p in params.named_parameters()}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_tiny_vgg(batch_norm=False).double())
        x, y = _ddp_batch()
        shard = slice(rank * 2, rank * 2 + 2)  # DDP averages: mean of shard means = mean over the batch
        grads = {m: _penalty_grads(model, x[shard], y[shard], m) for m in METHODS}
        buffers = {}
        for method in METHODS:  # with BatchNorm: each rank's running stats as after one plain DDP forward
            with_bn, plain = DistributedDataParallel(_tiny_vgg()), DistributedDataParallel(_tiny_vgg())
            xs, ys = x[shard].float() + rank, y[shard]
            loss, _, _ = batch_loss(with_bn, xs, ys, _reg(LAM, method))
            loss.backward()
            plain(xs)
            buffers[method] = (list(with_bn.module.buffers()), list(plain.module.buffers()))
        torch.save({"grads": grads, "buffers": buffers}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    """What each of two gloo DDP ranks computed (one spawn for the tests below)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def test_ddp_penalty_gradients_equal_single_process_gradients_on_the_whole_batch(ddp_results):
    x, y = _ddp_batch()
    single = _tiny_vgg(batch_norm=False).double()
    for method in METHODS:
        want = _penalty_grads(single, x, y, method)
        for rank, result in enumerate(ddp_results):
            for name, grad in want.items():
                assert torch.allclose(result["grads"][method][name], grad, rtol=1e-9, atol=1e-15), (rank, method, name)


def test_ddp_penalty_moves_each_ranks_batchnorm_stats_like_one_plain_forward(ddp_results):
    for rank, result in enumerate(ddp_results):
        for method, (got, want) in result["buffers"].items():
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (rank, method)
