"""GPU check: run before a sweep on one GPU node (or any bare CUDA box).

Needs torch, pydantic (the workers' typed config, :mod:`trainables.config`) and
this project's worker-side modules (``trainables``, ``analysis``): no Ray,
MLflow or Optuna is imported, so it runs on a box where the project itself is
not installed (``pip install torch pydantic``, or carry pydantic's wheels). Each check runs on the device as a sweep
would (bf16 autocast, channels_last) and is compared with the same computation
in float32 on the CPU:

1. one training step of each regularizer (plain, dropout, FocusedDropout, the
   exact and the finite-difference input-gradient penalty): the cosine between
   the device's and the CPU's parameter gradients (bf16 keeps about 0.9; the
   finite difference taken in bf16 gave 0.1 before it was moved to float32),
   then one epoch on the device: finite losses, images/s;
2. per-unit ablation of conv5_3: the device's float32 counts against the CPU's
   float64 ones (near-ties may flip a few (unit, image) pairs);
3. dissection of conv5_3: thresholds and labels against the CPU's;
4. the dissection's pruning needs each map upsampled alone to give the same bits
   as in any batch (:func:`analysis.upsample.upsample_rows`, elementwise IEEE
   arithmetic by construction): checked on the device for four map and mask
   sizes, one map alone included, and against the CPU's bits.

Without CUDA it prints one line saying it skipped (``--device cpu`` runs the
same comparisons on the CPU under bf16 autocast, to check the script itself).
The last line is the verdict.

``--table`` (``make gpu-check``) also runs ``benchmarks/gpu.py`` (speed, packing,
projections) in a process of its own and ends with one table of every check and
figure, the GPU named; without CUDA it too prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.ablation import ablate_units  # noqa: E402
from analysis.concepts import ShapesConcepts, concept_batches  # noqa: E402
from analysis.dissection import dissect_layer  # noqa: E402
from trainables.config import WorkerConfig  # noqa: E402
from trainables.data import MEAN_STD, DeviceLoader, make_shapes  # noqa: E402
from trainables.regularizers import batch_loss, build_model  # noqa: E402

REGULARIZERS = {
    "plain": {},
    "dropout 0.2": {"dropout": {"rate": 0.2}},
    "FocusedDropout 0.5": {"focused_dropout": {"par_rate": 0.5}},
    "penalty, double backprop": {"gradient_penalty": {"lambda": 0.1, "method": "double_backprop"}},
    "penalty, finite difference": {"gradient_penalty": {"lambda": 0.1, "method": "finite_difference"}},
}
MIN_COSINE = 0.8


def config(width: float, changes: dict) -> WorkerConfig:
    """The typed worker config (what build_model and batch_loss read) of a VGG-16-BN of ``width``."""
    reg = {"focused_dropout": {"par_rate": 0.0, "gamma": [0.6, 0.9], "site": "pool4"}, "dropout": {"rate": 0.0},
           "gradient_penalty": {"lambda": 0.0, "method": "double_backprop", "h": 0.01, "every": 1}}
    for section, values in changes.items():
        reg[section] = {**reg[section], **values}
    return WorkerConfig.from_dump({"model": {"variant": "cifar", "batch_norm": True, "width": width, "num_classes": 20},
                                   "regularization": reg, "train": {"seed": 0}})


def gradients(model, x, y, reg, device, bf16: bool) -> torch.Tensor:
    """All parameter gradients of one batch_loss step, flattened (float32, on the CPU)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    for m in model.modules():
        if hasattr(m, "generator"):
            m.generator.manual_seed(1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _, _ = batch_loss(model, x, y, reg)
    loss.backward()
    return torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.grad is not None])


def check_regularizers(device, width: float, images: int) -> list[tuple[str, bool, str]]:
    data = make_shapes(images, 32, seed=0)
    mean, std = MEAN_STD["shapes"]
    results = []
    for name, changes in REGULARIZERS.items():
        cfg = config(width, changes)
        torch.manual_seed(0)
        cpu_model = build_model(cfg).train()
        dev_model = copy.deepcopy(cpu_model).to(device).to(memory_format=torch.channels_last)
        x = (data.images[:64].float() - torch.tensor(mean).view(1, -1, 1, 1) * 255) / (
            torch.tensor(std).view(1, -1, 1, 1) * 255)
        y = data.labels[:64]
        ref = gradients(cpu_model, x, y, cfg.regularization, torch.device("cpu"), bf16=False)
        got = gradients(dev_model, x.to(device).contiguous(memory_format=torch.channels_last), y.to(device),
                        cfg.regularization, device, bf16=True)
        cosine = F.cosine_similarity(got, ref, dim=0).item()
        loader = DeviceLoader(data.images, data.labels, batch_size=64, device=device, mean=mean, std=std)
        opt = torch.optim.SGD(dev_model.parameters(), lr=0.01, momentum=0.9)
        losses, t0 = [], time.perf_counter()
        for xb, yb in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, _, _ = batch_loss(dev_model, xb.contiguous(memory_format=torch.channels_last), yb,
                                        cfg.regularization)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = len(losses) * 64 / (time.perf_counter() - t0)
        finite = bool(torch.isfinite(torch.stack(losses)).all())
        ok = cosine >= MIN_COSINE and finite
        results.append((f"train step, {name}", ok,
                        f"gradient cosine to CPU float32 {cosine:.3f} (need >= {MIN_COSINE}); one epoch: "
                        f"{'finite' if finite else 'NON-FINITE'} losses, {rate:.0f} images/s (bf16, channels_last)"))
    return results


def check_analysis(device, width: float) -> list[tuple[str, bool, str]]:
    torch.manual_seed(0)
    model = build_model(config(width, {})).eval()
    data = make_shapes(256, 32, seed=3)
    mean, std = MEAN_STD["shapes"]

    def batches(dev):
        return list(DeviceLoader(data.images, data.labels, batch_size=128, device=dev, mean=mean, std=std,
                                 train=False))

    ref = ablate_units(model, "conv5_3", batches("cpu"), device="cpu", num_classes=20, dtype=torch.float64)
    got = ablate_units(model, "conv5_3", batches(device), device=device, num_classes=20)
    flipped = int((got.correct - ref.correct).abs().sum())
    pairs = ref.units.numel() * ref.num_images
    results = [("ablation of conv5_3", flipped <= 0.005 * pairs,
                f"{flipped} of {pairs} (unit, image) results differ from CPU float64 (allowed: 0.5%, near-ties)")]

    concepts = ShapesConcepts.generate(64, 112, seed=2)
    per = {}
    for dev in ("cpu", device):
        b = concept_batches(concepts, torch.arange(concepts.num_images), batch_size=32, mean_std=MEAN_STD["shapes"],
                            device=dev)
        per[str(dev)] = dissect_layer(model.to(dev), "conv5_3", b, concepts.concepts, device=dev, quantile=0.05)
    model.cpu()
    a, b = per["cpu"], per[str(device)]
    t_err = ((a.counts.thresholds - b.counts.thresholds.cpu()).abs() / a.counts.thresholds.abs().clamp_min(1e-6)).max()
    same = float((a.units["label"] == b.units["label"]).mean())
    results.append(("dissection of conv5_3", t_err.item() <= 1e-3 and same >= 0.95,
                    f"thresholds within {t_err.item():.1e} relative of the CPU's (need 1e-3); labels agree on "
                    f"{same:.0%} of units (need 95%)"))

    from analysis.upsample import upsample_rows

    differ = cross = 0
    g = torch.Generator().manual_seed(1)
    for h, w, size in ((2, 2, (32, 32)), (7, 7, (112, 112)), (3, 5, (8, 13)), (14, 14, (112, 112))):
        maps = torch.randn(300, h, w, generator=g).clamp_min(0)
        on_cpu = upsample_rows(maps, size)
        full = upsample_rows(maps.to(device), size)
        cross += int(not torch.equal(full.cpu(), on_cpu))
        for n in (1, 2, 3, 37, 150):
            pick = torch.randperm(300, generator=g)[:n]
            differ += int(not torch.equal(upsample_rows(maps[pick].to(device), size), full[pick.to(device)]))
    results.append(("row-independent upsampling", differ == 0 and cross == 0,
                    f"{differ} of 20 subsets of maps upsampled to other bits than in the whole batch, and {cross} "
                    "of 4 batches to other bits than on the CPU (need 0 and 0: elementwise IEEE arithmetic)"))
    return results


def speed_figures(extra: list[str], timeout_s: float) -> tuple[dict, str]:
    """``benchmarks/gpu.py``'s figures (its ``--json``) and its last line; ({}, why) when it did not finish."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gpu.json"
        cmd = [sys.executable, str(Path(__file__).with_name("gpu.py")), "--json", str(out), *extra]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {}, f"gpu.py did not finish in {timeout_s:.0f} s"
        sys.stdout.write(r.stdout)
        if r.returncode or not out.exists():
            return {}, f"gpu.py failed (exit {r.returncode}): {(r.stderr.strip().splitlines() or [''])[-1][:200]}"
        return json.loads(out.read_text()), r.stdout.strip().splitlines()[-1]


def gpu_table(device_name: str, results: list[tuple[str, bool, str]], figures: dict, speed_note: str) -> str:
    """One markdown table: every correctness check (ok / FAIL), then every speed figure."""
    rows = [f"| {name} | {'ok' if ok else 'FAIL'}: {detail} |" for name, ok, detail in results]
    for key, value in figures.items():
        if key not in ("device", "batch", "width"):
            text = f"{value:,.0f}" if "images/s" in key else f"{value:.2f}" if isinstance(value, float) else value
            rows.append(f"| {key} | {text} |")
    if not figures:
        rows.append(f"| speed (benchmarks/gpu.py) | not measured: {speed_note} |")
    return "\n".join([f"| gpu-check on {device_name} | result |", "|---|---|", *rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks this script on the CPU)")
    ap.add_argument("--width", type=float, default=0.25, help="VGG-16 width multiplier")
    ap.add_argument("--images", type=int, default=1024, help="images in the one-epoch training check")
    ap.add_argument("--table", action="store_true", help="also run benchmarks/gpu.py; end with one table")
    ap.add_argument("--speed-args", default="", help="arguments for benchmarks/gpu.py under --table")
    ap.add_argument("--speed-timeout", type=float, default=390, help="seconds benchmarks/gpu.py may take")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        what = "gpu-check" if args.table else "gpu_check"
        print(f"{what}: skipped, no CUDA device here (run it on a GPU node; --device cpu checks the script)")
        return 0
    device = torch.device(args.device)
    print(f"gpu_check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}, "
          f"torch {torch.__version__}, VGG-16-BN width {args.width}")
    results = check_regularizers(device, args.width, args.images) + check_analysis(device, args.width)
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    failed = [name for name, ok, _ in results if not ok]
    verdict = (f"gpu_check: {len(results) - len(failed)}/{len(results)} checks passed"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    figures = {"table": "off"}
    if args.table:
        extra = ["--device", args.device, *args.speed_args.split()]
        figures, note = speed_figures(extra, args.speed_timeout)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        print(gpu_table(f"{name}, torch {torch.__version__}", results, figures, note))
        verdict += "" if figures else f"; speed not measured ({note})"
    print(verdict)
    return 1 if failed or not figures else 0


if __name__ == "__main__":
    sys.exit(main())
