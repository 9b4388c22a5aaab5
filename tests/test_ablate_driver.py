"""The ablation and intervention drivers (`study ablate`, `study intervene`): Ray fan-out, resume, outputs, MLflow.

A tiny random VGG-16-BN (width 1/16: 32 conv5_3 units) on 200 generated test
images and about 200 validation images held out of the 400 train images; every Ray test uses the session cluster.
References are computed in this process on the same images in the same batches
(the shards, one after another), so counts must agree exactly.
"""

import itertools
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

import study.intervene as intervene_module
from analysis.ablation import ablate_units, ablate_units_naive
from analysis.evaluation import model_from_state_dict
from analysis.intervention import run_table1
from analysis.stats import bh_level, mcnemar_mde
from study.ablate import ablate, run_ablation
from study.cli import main
from study.config import load_config
from study.fanout import HOLD_ENV, report_split, validation_split
from study.intervene import run_intervention
from study.sources import prepare
from trainables.checkpoint import checkpoint_dict, save_checkpoint
from trainables.data import MEAN_STD, DeviceLoader, load_arrays, train_val_split
from trainables.loop import STOP_ENV
from trainables.models import vgg16

from .conftest import ROOT, kill_when_stopped

NUM_CLASSES = 20
UNITS = 32  # conv5_3 at width 1/16
SHARDS = 2
CHUNK = 12  # 32 units -> chunks of 12, 12, 8: a 3 x 2 grid of tasks


def tiny_model(**kw):
    torch.manual_seed(0)
    return vgg16("cifar", batch_norm=kw.get("batch_norm", True), width=0.0625, num_classes=kw.get("num_classes", 20))


def briefly_trained(cfg):
    """A few SGD epochs on the train images (not the validation ones), so predictions vary and ablations change some."""
    model = tiny_model()
    images, labels = load_arrays(cfg.dump()["data"], train=True)
    fit, _ = train_val_split(labels, cfg.data.val_fraction, cfg.data.seed)
    images, labels = images[fit], labels[fit]
    mean, std = MEAN_STD[cfg.data.name]
    loader = DeviceLoader(images, labels, batch_size=50, mean=mean, std=std, train=True, augment=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for epoch in range(6):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def cli(*args: str) -> int:
    """``study`` in this process (the session's Ray cluster is reused): the exit code."""
    try:
        return main(list(args))
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def setup(ray_cluster, tmp_path_factory):
    """A checkpoint saved by a fake training run: MLflow parent + trial run with the artifact and checkpoint_uri."""
    tmp = tmp_path_factory.mktemp("ablate").resolve()
    old_cwd = os.getcwd()
    os.chdir(tmp)  # MLflow's default artifact root (./mlruns) and outputs/ land here
    sets = [
        "data.num_train=400",
        "data.num_test=200",
        "model.width=0.0625",
        "data.val_fraction=0.5",
        f"tracking.mlflow_uri=sqlite:///{tmp}/mlflow.db",
        "tracking.experiment=test",
        f"ray.storage_path={tmp}/ray",
        "ablation.layer=conv5_3",  # the layer whose fc6 the fast path updates by low rank
        "dissection.layer=conv5_3",
    ]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", sets)
    folder = tmp / "ray" / "train-t0" / "checkpoint_0"
    path = save_checkpoint(folder / "checkpoint.pt", checkpoint_dict(briefly_trained(cfg), epoch=6, config=cfg.dump()))
    client = MlflowClient(cfg.tracking.mlflow_uri)
    exp = client.create_experiment("test", artifact_location=str(tmp / "mlruns"))
    parent = client.create_run(exp, run_name="train-parent").info.run_id
    trial = client.create_run(exp, run_name="trial", tags={"mlflow.parentRunId": parent,
                                                           "checkpoint_uri": str(folder)}).info.run_id
    client.log_artifacts(trial, str(folder), artifact_path="checkpoint")
    bare = client.create_run(exp, run_name="no-checkpoint").info.run_id
    yield {"tmp": tmp, "cfg": cfg, "path": path, "client": client, "parent": parent, "trial": trial, "bare": bare,
           "sets": ["tracking.mlflow_uri=" + cfg.tracking.mlflow_uri, f"ablation.unit_chunk={CHUNK}"]}
    os.chdir(old_cwd)


def shard_batches(cfg, split):
    """The driver's data shards, batched as its tasks batch them, one after another (single process)."""
    images, labels = load_arrays(cfg.dump()["data"], train=split.train)
    mean, std = MEAN_STD[cfg.data.name]
    n = split.num_images
    loaders = []
    for s in range(SHARDS):
        idx = split.indices[s * n // SHARDS : (s + 1) * n // SHARDS]
        loaders.append(DeviceLoader(images[idx], labels[idx], batch_size=256, mean=mean, std=std, train=False))
    return list(itertools.chain(*loaders))


@pytest.fixture(scope="module")
def first_run(setup):
    return run_ablation(str(setup["path"]), overrides=setup["sets"], out=setup["tmp"] / "out", num_shards=SHARDS,
                        quiet=True)


def single_process_counts(setup):
    cfg = setup["cfg"]
    model = model_from_state_dict(torch.load(setup["path"], weights_only=True), device="cpu")
    return ablate_units(model, "conv5_3", shard_batches(cfg, report_split(cfg)), device="cpu", num_classes=NUM_CLASSES)


def assert_same_counts(a, b):
    assert torch.equal(a.units, b.units)
    assert torch.equal(a.correct, b.correct) and torch.equal(a.lost, b.lost)
    assert torch.equal(a.total, b.total)
    assert torch.equal(a.baseline_correct, b.baseline_correct)


def test_ray_fanned_ablation_equals_single_process(setup, first_run):
    assert len(first_run.fan_out.computed) == 3 * SHARDS, "3 unit chunks x 2 data shards"
    assert_same_counts(first_run.counts, single_process_counts(setup))
    assert first_run.counts.num_images == 200
    changed = (first_run.counts.correct != first_run.counts.baseline_correct).any(1)
    assert changed.sum() >= 3, "a non-trivial comparison: several ablations change some class's count"


def test_float64_ablation_equals_the_naive_loop_and_needs_no_precision_check(setup, tmp_path):
    result = run_ablation(str(setup["path"]), overrides=setup["sets"] + ["ablation.dtype=float64"], units="0,5,9",
                          out=tmp_path / "f64", num_shards=SHARDS, quiet=True)
    model = model_from_state_dict(torch.load(setup["path"], weights_only=True), device="cpu")
    naive = ablate_units_naive(model, "conv5_3", shard_batches(result.cfg, report_split(result.cfg)), [0, 5, 9],
                               device="cpu", num_classes=NUM_CLASSES, dtype=torch.float64)
    assert_same_counts(result.counts, naive)
    assert result.fan_out.precision == (0, 0)


def test_task_failing_once_is_retried_and_every_unit_appears_once(setup, tmp_path):
    cfg, source = prepare(str(setup["path"]), None, setup["sets"], layer=None, units=None, workdir=tmp_path)
    faults = tmp_path / "faults"
    result = ablate(cfg, source, out_dir=tmp_path / "out", num_shards=SHARDS, quiet=True, fail_once_dir=faults)
    assert len(list(faults.iterdir())) == 3 * SHARDS, "every task failed on its first attempt"
    assert result.counts.units.tolist() == list(range(UNITS)), "each unit exactly once, in order"
    assert_same_counts(result.counts, single_process_counts(setup))


def test_rerun_reuses_finished_parts_and_recomputes_only_a_missing_one(setup, first_run):
    again = run_ablation(str(setup["path"]), overrides=setup["sets"], out=setup["tmp"] / "out", quiet=True)
    assert again.fan_out.computed == [] and len(again.fan_out.reused) == 3 * SHARDS
    (part,) = (setup["tmp"] / "out" / "parts").glob("ablation-test-*/chunk001-shard000.pt")
    part.unlink()
    resumed = run_ablation(str(setup["path"]), overrides=setup["sets"], out=setup["tmp"] / "out", quiet=True)
    assert resumed.fan_out.computed == ["chunk001-shard000"]
    assert_same_counts(resumed.counts, first_run.counts)


def test_outputs_have_tidy_columns_and_the_mlflow_run_links_to_the_training_run(setup, first_run):
    out = setup["tmp"] / "out"
    tidy = pd.read_parquet(out / "ablation.parquet")
    assert {"unit", "class", "accuracy", "baseline_accuracy", "change"} <= set(tidy.columns)
    assert len(tidy) == UNITS * NUM_CLASSES
    assert pd.read_csv(out / "ablation.csv").shape == tidy.shape
    ranked = pd.read_csv(out / "units_ranked.csv")
    assert sorted(ranked["unit"]) == list(range(UNITS)) and {"rank", "verdict", "change"} <= set(ranked.columns)
    assert {"p_value", "q_value", "significant", "ci_low", "ci_high"} <= set(ranked.columns)
    assert ranked["significant"].equals(ranked["q_value"] < 0.05)
    per_class = pd.read_csv(out / "units_ranked_per_class.csv")
    assert set(per_class["verdict"]) <= {"useful", "harmful", "neutral"} and (per_class["change"] != 0).all()
    assert (per_class["verdict"] != "neutral").equals(per_class["q_value"] < 0.05), "verdicts only at q < 0.05"
    assert (ranked["verdict"] != "neutral").equals(ranked["significant"])
    for png in ("unit_change.png", "heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    client = setup["client"]
    run = client.get_run(first_run.run_id)
    assert run.data.tags["kind"] == "ablation"
    assert run.data.tags["source_run_id"] == setup["trial"], "found by the trial run's checkpoint_uri tag"
    assert run.data.tags["mlflow.parentRunId"] == setup["trial"], "nests under the trial that trained it"
    assert run.data.tags["study_run_id"] == setup["parent"], "and names that trial's study"
    assert f"runs/{setup['trial']})" in run.data.tags["mlflow.note.content"], "the description links the source run"
    baseline = first_run.counts.baseline_correct.sum().item() / 200
    assert run.data.metrics["ablation/baseline_acc"] == pytest.approx(baseline)
    assert run.data.metrics["ablation/significant_units"] == ranked["significant"].sum()
    assert run.data.metrics["selected/epoch"] == 7 and run.data.tags["checkpoint_epoch"] == "7", \
        "the epoch of the checkpoint it read (saved at epoch index 6; no history: no accuracies)"
    assert not {"selected/val_acc_pct", "selected/test_acc_pct"} & set(run.data.metrics)
    assert all(k.startswith("ablation.") for k in run.data.params) and "None" not in run.data.params.values(), \
        "its own settings only (this trial run swept nothing)"
    assert not {"ablation.top_k", "ablation.factors", "ablation.unit_chunk"} & set(run.data.params)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["shapes"], "the data it was evaluated on"
    errors = 200 - first_run.counts.baseline_correct.sum().item()
    drop, _ = mcnemar_mde(200, errors, bh_level(ranked["q_value"], 0.05))
    assert run.data.metrics["ablation/mde_pt"] == pytest.approx(100 * float(drop)), "the power of the null, logged"
    pairs, differ = (run.data.metrics["ablation/precision_pairs_checked"],
                     run.data.metrics["ablation/precision_pairs_differ"])
    assert pairs == UNITS * 64 and 0 <= differ <= pairs, "64 sampled images, every unit, re-checked in float64"
    logged = {a.path for a in client.list_artifacts(first_run.run_id)}
    assert {"ablation.parquet", "ablation.csv", "units_ranked.csv", "units_ranked_per_class.csv",
            "unit_change.png", "heatmap.png"} <= logged


def test_ablate_by_run_id_downloads_the_artifact_and_prints_a_summary(setup, capsys):
    code = cli("ablate", "--checkpoint", setup["trial"], "--units", "0,5,9", "--out", str(setup["tmp"] / "by-id"),
                 *itertools.chain.from_iterable(("--set", s) for s in setup["sets"]))
    out = capsys.readouterr().out
    assert code == 0
    assert "3 units ablated" in out and "baseline accuracy" in out and "with 80% power the test on these" in out
    run_id = out.split("MLflow run ")[1].split()[0]
    tags = setup["client"].get_run(run_id).data.tags
    assert tags["source_run_id"] == setup["trial"] and tags["mlflow.parentRunId"] == setup["trial"]
    assert tags["study_run_id"] == setup["parent"]
    assert "#/experiments/" in out and f"/runs/{run_id}" in out, "the run's direct UI link is printed"


def test_intervene_matches_single_process_table1_and_logs_it(setup, capsys):
    sets = setup["sets"] + ["ablation.top_k=2"]
    result = run_intervention(str(setup["path"]), overrides=sets, factors="2,3", out=setup["tmp"] / "iv",
                              num_shards=SHARDS, quiet=True)
    cfg = result.cfg
    model = model_from_state_dict(torch.load(setup["path"], weights_only=True), device="cpu")
    expected = run_table1(model, "conv5_3", selection_batches=shard_batches(cfg, validation_split(cfg)),
                          report_batches=shard_batches(cfg, report_split(cfg)), device="cpu",
                          num_classes=NUM_CLASSES, k=2, factors=(2.0, 3.0))
    pd.testing.assert_frame_equal(result.table, expected)
    labels = load_arrays(cfg.dump()["data"], train=True)[1]
    _, val = train_val_split(labels, 0.5, cfg.data.seed)
    assert result.selection.total.sum() == val.numel() and result.report.total.sum() == 200, "validation vs test"
    assert set(result.table.columns) >= {"p_value", "significant", "ci_low", "ci_high"}
    assert "p" in table1_columns(setup["tmp"] / "iv" / "table1.md")

    run = setup["client"].get_run(result.run_id)
    assert run.data.tags["kind"] == "intervention" and run.data.tags["source_run_id"] == setup["trial"]
    assert {"table1.csv", "table1.md"} <= {a.path for a in setup["client"].list_artifacts(result.run_id)}
    assert "| baseline (none)" in (setup["tmp"] / "iv" / "table1.md").read_text()

    # the CLI prints Table 1 (the parts are reused, so this is quick)
    code = cli("intervene", "--checkpoint", str(setup["path"]), "--top-k", "2", "--factors", "2,3",
               "--out", str(setup["tmp"] / "iv"), *itertools.chain.from_iterable(("--set", s) for s in sets))
    printed = capsys.readouterr().out
    assert code == 0 and "| units" in printed and "baseline (none)" in printed and "worst-2" in printed


def table1_columns(path):
    header = next(line for line in path.read_text().splitlines() if line.startswith("| units"))
    return [c.strip() for c in header.strip("|").split("|")]


def test_units_are_selected_on_validation_images_and_never_on_test_images(setup, monkeypatch):
    """Spy on what the intervention driver evaluates: the selection ablation and the stopping
    rule see only the validation images the training held out; the test split is only reported."""
    seen = []
    real_ablation, real_interventions = intervene_module.ablation_counts, intervene_module.intervention_counts_fanned

    def spy_ablation(cfg, source, split, *a, **kw):
        seen.append(("select units", split))
        return real_ablation(cfg, source, split, *a, **kw)

    def spy_interventions(cfg, source, split, *a, **kw):
        seen.append(("interventions", split))
        return real_interventions(cfg, source, split, *a, **kw)

    monkeypatch.setattr(intervene_module, "ablation_counts", spy_ablation)
    monkeypatch.setattr(intervene_module, "intervention_counts_fanned", spy_interventions)
    result = run_intervention(str(setup["path"]), overrides=setup["sets"] + ["ablation.top_k=2"], factors="2",
                              out=setup["tmp"] / "iv-spy", num_shards=SHARDS, quiet=True)
    cfg = result.cfg
    fit, val = train_val_split(load_arrays(cfg.dump()["data"], train=True)[1], 0.5, cfg.data.seed)
    (select,) = [split for what, split in seen if what == "select units"]
    assert select.train and torch.equal(select.indices, val), "units are chosen on the held-out validation images"
    assert not set(select.indices.tolist()) & set(fit.tolist()), "none of them was trained on"
    test_reads = [what for what, split in seen if not split.train]
    assert test_reads == ["interventions"], "the test split is read once, to report the chosen interventions"
    stop_rule = result.table["below_baseline"]
    assert list(stop_rule) == list(result.table["selection_accuracy"] < result.table["selection_baseline"])


def test_intervene_refuses_a_checkpoint_trained_without_a_validation_split(setup, tmp_path, capsys):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["model.width=0.0625", "data.val_fraction=0"])
    path = save_checkpoint(tmp_path / "checkpoint.pt", checkpoint_dict(tiny_model(), epoch=0, config=cfg.dump()))
    assert cli("intervene", "--checkpoint", str(path), "--set", "tracking.mlflow_uri=" + setup["cfg"].tracking.mlflow_uri) == 2
    one_error_line(capsys.readouterr().err, "data.val_fraction = 0", "train with data.val_fraction > 0")


# --------------------------------------------------------------------------- bad inputs


def one_error_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_unknown_layer_and_corrupt_file_exit_2_with_one_line(setup, run_study, tmp_path):
    r = run_study("ablate", "--checkpoint", str(setup["path"]), "--layer", "conv5_4", cwd=setup["tmp"])
    assert r.returncode == 2
    one_error_line(r.stderr, "conv5_4", "conv5_3")
    corrupt = tmp_path / "checkpoint.pt"
    corrupt.write_bytes(setup["path"].read_bytes()[:500])
    r = run_study("ablate", "--checkpoint", str(corrupt), cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr, "not a readable torch checkpoint")


@pytest.mark.parametrize(
    "case, needles",
    [
        ("unit out of range", ("unit 32 is out of range", "0..31")),
        ("another class count", ("num_classes=10", "num_classes=20")),
        ("another architecture", ("batch_norm=False",)),
        ("unknown run id", ("no MLflow run",)),
        ("run without checkpoint", ("no checkpoint/checkpoint.pt artifact",)),
        ("missing file", ("no checkpoint file",)),
        ("bad --units", ("--units expects",)),
    ],
)
def test_bad_inputs_give_one_clear_error_line(setup, tmp_path, capsys, case, needles):
    sets = ["--set", "tracking.mlflow_uri=" + setup["cfg"].tracking.mlflow_uri]
    quick = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--set", "model.width=0.0625", *sets]
    args = {
        "unit out of range": ["--checkpoint", str(setup["path"]), "--units", "0,32", *sets],
        "another class count": ["--checkpoint", str(tmp_path / "c10.pt"), *quick],
        "another architecture": ["--checkpoint", str(tmp_path / "nobn.pt"), *quick],
        "unknown run id": ["--checkpoint", "0123456789abcdef0123456789abcdef", *sets],
        "run without checkpoint": ["--checkpoint", setup["bare"], *sets],
        "missing file": ["--checkpoint", str(tmp_path / "nothing.pt"), *sets],
        "bad --units": ["--checkpoint", str(setup["path"]), "--units", "3,x", *sets],
    }[case]
    # bare state dicts (no config): the --config decides what they must be
    save_checkpoint(tmp_path / "c10.pt", tiny_model(num_classes=10).state_dict())
    save_checkpoint(tmp_path / "nobn.pt", tiny_model(batch_norm=False).state_dict())
    assert cli("ablate", *args) == 2
    one_error_line(capsys.readouterr().err, *needles)


def test_gpu_tasks_own_their_gpu_and_cpu_tasks_reuse_workers(ray_cluster):
    from study.ablate import ablation_task
    from study.fanout import remote_function

    on_gpu, on_cpu = remote_function(ablation_task, 0.25), remote_function(ablation_task, 0.0)
    assert on_gpu._default_options["max_calls"] == 1, "a GPU task's worker exits after it"
    assert on_cpu._default_options.get("max_calls", 0) == 0, "0 / unset: CPU workers are reused"
    assert remote_function(ablation_task, 0.5) is on_gpu, "declared once"


def test_dissection_parts_are_resumable_and_equal_the_single_process_dissection(setup):
    """A rerun reuses every saved part; with one IoU part deleted it recomputes that part only (its pass-1
    activations are gone, so the task runs the network again), and the counts equal one in-process pass."""
    from analysis.concepts import concept_batches
    from analysis.dissection import dissect_layer
    from study.dissect import concept_data, run_dissection

    sets = [*setup["sets"], "dissection.num_images=64", "dissection.image_size=32"]
    out = setup["tmp"] / "dissect"
    first = run_dissection(str(setup["path"]), overrides=sets, out=out, num_shards=2, quiet=True)
    assert first.computed == first.num_tasks == 4
    again = run_dissection(str(setup["path"]), overrides=sets, out=out, num_shards=2, quiet=True, join=True)
    assert again.computed == 0
    # `study dissect --join`: the layer's units ablated on the test images and joined with their labels
    assert again.join.units["unit"].tolist() == list(range(len(again.units)))
    assert (out / "units_joined.csv").exists() and (out / "groups_joined.csv").exists()
    assert again.join.headline.startswith("join: ")
    (part,) = list(out.glob("parts/dissection-*/iou-shard001.pt"))
    part.unlink()
    resumed = run_dissection(str(setup["path"]), overrides=sets, out=out, quiet=True)  # plan.json keeps 2 shards
    assert resumed.computed == 1

    cfg = prepare(str(setup["path"]), None, sets, layer=None, units=None, workdir=setup["tmp"])[0]
    data = concept_data(cfg)
    model = model_from_state_dict(torch.load(setup["path"], weights_only=True), device="cpu")
    batches = [b for lo, hi in ((0, 32), (32, 64)) for b in concept_batches(
        data, torch.arange(lo, hi), batch_size=256, mean_std=MEAN_STD[cfg.data.name])]
    reference = dissect_layer(model, "conv5_3", batches, data.concepts, device="cpu", quantile=cfg.dissection.quantile,
                              iou_threshold=cfg.dissection.iou_threshold)
    # the radix-histogram thresholds (bounded memory): two pass-1 fan-outs, the same thresholds; a lost
    # selection part is recomputed alone (its shard's activations are gone: the task reruns the network)
    radix_out = setup["tmp"] / "dissect-radix"
    radix = run_dissection(str(setup["path"]), overrides=[*sets, "dissection.threshold_method=histogram"],
                           out=radix_out, num_shards=2, quiet=True)
    assert radix.computed == radix.num_tasks == 6
    (part,) = list(radix_out.glob("parts/dissection-*/select-shard000.pt"))
    part.unlink()
    radix_resumed = run_dissection(str(setup["path"]), overrides=[*sets, "dissection.threshold_method=histogram"],
                                   out=radix_out, quiet=True)
    assert radix_resumed.computed == 1
    for result in (first, resumed, radix, radix_resumed):
        assert torch.equal(result.counts.thresholds, reference.counts.thresholds)
        assert torch.equal(result.counts.intersection, reference.counts.intersection)
        assert torch.equal(result.counts.unit_area, reference.counts.unit_area)
        assert result.units["label"].tolist() == reference.units["label"].tolist()


# --------------------------------------------------------------------------- kill and resume, real processes


def kill_after_one_part(setup, tmp_path, command: str, sets: list[str], out) -> dict:
    """``study <command>`` in a subprocess joined to the session cluster, its tasks held (HOLD_ENV): one task
    is released and its part saved, a second is running (held) when the driver is SIGKILLed.
    Returns the saved parts' modification times."""
    import ray

    hold = tmp_path / f"hold-{command}"
    args = [sys.executable, "-m", "study.cli", command, "--checkpoint", str(setup["path"]), "--out", str(out)]
    for item in [*sets, f"ray.address={ray.get_runtime_context().gcs_address}"]:
        args += ["--set", item]
    proc = subprocess.Popen(args, cwd=setup["tmp"], env=dict(os.environ, **{HOLD_ENV: str(hold)}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def wait_for(what, check, timeout=180):
            deadline = time.time() + timeout
            while not check():
                assert proc.poll() is None, f"study {command} ended before the kill: {proc.stderr.read()[-2000:]}"
                assert time.time() < deadline, f"timed out waiting for {what}"
                time.sleep(0.1)

        def started():
            return sorted(p.name[len("started-"):] for p in hold.glob("started-*")) if hold.is_dir() else []

        wait_for("a task to start", lambda: started())
        first = started()[0]
        (hold / f"go-{first}").write_text("")
        wait_for("its part", lambda: list(out.glob(f"parts/*/{first}.pt")))
        wait_for("a second task to start", lambda: len(started()) >= 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        hold.mkdir(parents=True, exist_ok=True)
        (hold / "abort").write_text("")  # a held task Ray did not kill with its driver ends now, without work
        if proc.poll() is None:
            proc.kill()
    return {p.name: p.stat().st_mtime_ns for p in out.glob("parts/*/*.pt")}


@pytest.mark.slow
def test_a_killed_ablation_driver_resumes_computing_each_part_once(setup, first_run, tmp_path):
    out = tmp_path / "out"
    saved = kill_after_one_part(setup, tmp_path, "ablate", setup["sets"], out)
    assert len(saved) == 1, "only the released task's part was saved before the kill"
    resumed = run_ablation(str(setup["path"]), overrides=setup["sets"], out=out, quiet=True)
    assert sorted(resumed.fan_out.reused) == [name[:-3] for name in saved], "the saved part is reused"
    assert len(resumed.fan_out.computed) + len(saved) == len(first_run.fan_out.computed), "every other part once"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("parts/*/*.pt") if p.name in saved} == saved
    assert_same_counts(resumed.counts, first_run.counts)


@pytest.mark.slow
def test_a_killed_dissection_driver_resumes_computing_each_part_once(setup, tmp_path):
    from study.dissect import run_dissection

    sets = [*setup["sets"], "dissection.num_images=64", "dissection.image_size=32"]
    out = tmp_path / "dissect"
    saved = kill_after_one_part(setup, tmp_path, "dissect", sets, out)
    assert len(saved) == 1
    resumed = run_dissection(str(setup["path"]), overrides=sets, out=out, quiet=True)
    assert resumed.computed == resumed.num_tasks - 1, "every part but the saved one, once"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("parts/*/*.pt") if p.name in saved} == saved
    whole = run_dissection(str(setup["path"]), overrides=sets, out=tmp_path / "uninterrupted", quiet=True)
    assert torch.equal(resumed.counts.thresholds, whole.counts.thresholds)
    for field in ("intersection", "unit_area", "concept_area"):
        assert torch.equal(getattr(resumed.counts, field), getattr(whole.counts, field))
    assert resumed.units.equals(whole.units)


@pytest.mark.slow
def test_an_ablation_killed_while_logging_its_run_leaves_one_whole_run_after_the_rerun(setup, first_run, tmp_path):
    """Every part is saved (the first run's); the driver is SIGKILLed with its MLflow run created and its metrics
    logged but not its artifacts. The rerun deletes that half-logged run and logs one whole run."""
    import ray

    out, stops = setup["tmp"] / "out", tmp_path / "stops"
    args = [sys.executable, "-m", "study.cli", "ablate", "--checkpoint", str(setup["path"]), "--out", str(out)]
    for item in [*setup["sets"], f"ray.address={ray.get_runtime_context().gcs_address}"]:
        args += ["--set", item]
    kill_when_stopped(args, cwd=setup["tmp"], env=dict(os.environ, **{STOP_ENV: f"analysis:0:{stops}"}),
                      marker=stops / "stopped-analysis-0", what="its MLflow run", timeout_s=180)
    c = setup["client"]
    exp = c.get_experiment_by_name("test").experiment_id
    (killed,) = c.search_runs([exp], filter_string="tags.kind = 'ablation' and attributes.status = 'RUNNING'")
    assert not c.list_artifacts(killed.info.run_id), "killed before its artifacts"

    rerun = run_ablation(str(setup["path"]), overrides=setup["sets"], out=out, quiet=True)
    assert not rerun.fan_out.computed, "every part was saved: only the logging ran again"
    assert c.get_run(killed.info.run_id).info.lifecycle_stage == "deleted"
    assert not c.search_runs([exp], filter_string="tags.kind = 'ablation' and attributes.status = 'RUNNING'")
    run = c.get_run(rerun.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["analysis_key"] == killed.data.tags["analysis_key"]
    for key in run.data.metrics:
        assert len(c.get_metric_history(rerun.run_id, key)) == 1, key
    names = sorted(a.path for a in c.list_artifacts(rerun.run_id))
    assert names == sorted(a.path for a in c.list_artifacts(first_run.run_id)) and len(names) == len(set(names))
