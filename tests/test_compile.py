"""``train.compile``: the compiled model trains and evaluates as the eager one does, on the CPU.

torch.compile (inductor) fuses and reorders float32 arithmetic, so the two agree
to rounding, not to the bit: over three SGD steps of a VGG-16-BN at width
0.0625 the summed losses, every parameter and the evaluation loss are compared
with a tolerance of 1e-4 (relative; for the parameters, of the largest one). Measured
here: the losses differ by 8e-8 relative, the parameters by 7e-7 of the largest.
Inductor compiles C++ on the CPU: the test needs a C++ compiler (``g++``) and is
skipped, saying so, without one. Its first run on a machine builds inductor's
headers and kernels (about 200 s on this shared 2-core machine under load; 15-30 s
once inductor's cache under /tmp holds them).
"""

import copy
import shutil

import pytest
import torch

from study.config import load_config
from trainables.config import RegularizationConfig, WorkerConfig
from trainables.data import DeviceLoader, make_shapes
from trainables.errors import ConfigError
from trainables.loop import compile_model, evaluate, train_one_epoch
from trainables.regularizers import build_model

from .conftest import ROOT

RTOL = 1e-4


def regularization(**gp) -> RegularizationConfig:
    return RegularizationConfig.model_validate({"gradient_penalty": gp})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler (g++); none is installed")
def test_compiled_training_and_evaluation_agree_with_eager_on_the_cpu(one_thread):
    cfg = WorkerConfig.from_dump({"model": {"width": 0.0625, "num_classes": 20}, "train": {"seed": 0}})
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = copy.deepcopy(eager)
    cpu = torch.device("cpu")
    assert compile_model(compiled, "on", cpu, cfg.regularization)
    assert not compile_model(eager, "off", cpu, cfg.regularization)
    data = make_shapes(80, 32, seed=0)
    out = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        train = DeviceLoader(data.images[:48], data.labels[:48], batch_size=16, seed=0)  # 3 steps, augmented
        test = DeviceLoader(data.images[48:], data.labels[48:], batch_size=16, train=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train_sums = train_one_epoch(model, train, opt, cfg.regularization, None, None, cpu)
        eval_sums = evaluate(model, test, None, cpu)
        out[name] = (train_sums, eval_sums, torch.cat([p.detach().flatten() for p in model.parameters()]))
    (t_e, e_e, p_e), (t_c, e_c, p_c) = out["eager"], out["compiled"]
    assert t_e[2] == t_c[2] == 48 and e_e[2] == e_c[2] == 32  # the same images went through both
    torch.testing.assert_close(t_c[0], t_e[0], rtol=RTOL, atol=0)  # summed training loss over the 3 steps
    torch.testing.assert_close(e_c[0], e_e[0], rtol=RTOL, atol=0)  # summed evaluation cross-entropy
    torch.testing.assert_close(p_c, p_e, rtol=RTOL, atol=RTOL * p_e.abs().max().item())
    assert not torch.equal(p_e, torch.cat([p.flatten() for p in build_model(cfg).parameters()])), "it trained"
    # the compiled module is the same object: its state_dict (the checkpoint) has the eager keys
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_auto_compiles_on_cuda_only_and_never_under_the_exact_penalty():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cases = {  # (mode, device, penalty) -> compiled; a stand-in module records the call instead of compiling
        ("auto", cpu, "off"): False, ("auto", cuda, "off"): True, ("auto", cuda, "double_backprop"): False,
        ("auto", cuda, "finite_difference"): True, ("on", cpu, "off"): True, ("off", cuda, "off"): False,
    }
    for (mode, device, penalty), expected in cases.items():
        reg = regularization() if penalty == "off" else regularization(**{"lambda": 0.1, "method": penalty})
        module = torch.nn.Linear(1, 1)
        calls = []
        module.compile = lambda: calls.append(1)
        assert compile_model(module, mode, device, reg) is expected and len(calls) == int(expected), (mode, penalty)


def test_compile_on_with_the_exact_penalty_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^train.compile=on cannot be combined with the double_backprop"):
        load_config(ROOT / "configs" / "quickstart.yaml",
                    ["train.compile=on", "regularization.gradient_penalty.lambda=0.1",
                     "regularization.gradient_penalty.method=double_backprop"])
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      ["train.compile=on", "regularization.gradient_penalty.lambda=0.1",
                       "regularization.gradient_penalty.method=finite_difference"])
    assert cfg.train.compile == "on"
