"""Distributed training on Ray Train inside a one-trial Tune study, logged to MLflow (`study train`)."""

import subprocess

import pytest
import torch
from mlflow.tracking import MlflowClient

from study.config import load_config
from study.runtime import with_absolute_paths
from study.train import train
from trainables.checkpoint import load_checkpoint
from trainables.errors import ConfigError, DataError

from .conftest import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
EPOCHS = 4


def small_config(tmp_path, *extra):
    """Two DDP workers, a narrow VGG-16-BN, every regularizer on (so resume must restore all RNG streams)."""
    return load_config(
        QUICKSTART,
        [
            "data.num_train=2400",
            "data.num_test=400",
            "model.width=0.125",
            f"train.epochs={EPOCHS}",
            f"train.t_max={EPOCHS}",
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            "train.batch_size=64",
            "train.lr=0.05",
            "train.test_images_per_epoch=100",  # the first 100 test images after epochs 1-3, all 400 after the last
            "regularization.focused_dropout.par_rate=0.25",
            "regularization.dropout.rate=0.2",
            "regularization.gradient_penalty.lambda=0.01",
            f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
            "tracking.experiment=test",
            f"ray.storage_path={tmp_path}/ray",
            *extra,
        ],
    )


def ck_epoch(trial) -> int:
    return load_checkpoint(f"{trial['checkpoint_path']}/checkpoint.pt")["epoch"]


def final_weights(trial):
    return load_checkpoint(f"{trial['checkpoint_path']}/checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = small_config(tmp)
    return cfg, train(cfg, quiet=True)


def test_two_worker_ddp_run_learns_well_above_chance(uninterrupted):
    cfg, result = uninterrupted
    (trial,) = result.trials
    # chance is 1/20; on 400 test images its binomial sd is ~1.1 points, so 12.5% is > 6 sd above it
    chance = 1 / cfg.num_classes
    assert trial["metrics"]["test/acc"] > 2.5 * chance
    assert trial["metrics"]["train/penalty"] > 0, "the penalty was computed and reported"
    assert trial["metrics"]["test/images"] == cfg.data.num_test, "test accuracy counts the whole test set"
    held_out = round(cfg.data.val_fraction * cfg.data.num_train)
    assert abs(trial["metrics"]["val/images"] - held_out) <= cfg.num_classes, "every validation image, on 2 ranks"


def test_run_is_logged_as_parent_and_child_with_per_epoch_metrics_and_checkpoint(uninterrupted):
    cfg, result = uninterrupted
    client = MlflowClient(cfg.tracking.mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    (trial,) = result.trials
    child = client.get_run(trial["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.status == "FINISHED"
    params = child.data.params
    assert params["regularization.focused_dropout.par_rate"] == "0.25"
    assert params["regularization.gradient_penalty.lambda"] == "0.01"
    assert params["train.num_workers"] == "2"
    for key in ("train/loss", "train/acc", "train/penalty", "val/loss", "val/acc", "test/loss", "test/acc",
                "time/epoch_s"):
        history = client.get_metric_history(child.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), f"{key}: step = epoch, from 1"
    artifacts = [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")]
    assert sorted(artifacts) == ["checkpoint/checkpoint.pt", "checkpoint/history.json"]  # the weights, every epoch
    # what a researcher filters and reads in the MLflow UI
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert child.data.tags["kind"] == "trial" and parent.data.tags["kind"] == "study"
    assert child.data.tags["mlflow.source.git.commit"] == child.data.tags["git_commit"] == (commit or "unknown")
    metrics = child.data.metrics
    assert metrics["epochs_completed"] == EPOCHS
    assert not any(k.endswith("/images") for k in metrics), "constant sizes are params, not charts"
    assert int(params["test_images"]) == int(trial["metrics"]["test/images"]) and int(params["val_images"]) > 0
    assert params["test_images"] == "400" and params["test_images_per_epoch"] == "100", "the last epoch: all of them"
    val = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val/acc")}
    test = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "test/acc")}
    # the headline: the last epoch, whose checkpoint is kept (its test accuracy on all 400 images), in percent
    assert metrics["selected/epoch"] == EPOCHS == ck_epoch(trial) + 1
    assert metrics["selected/val_acc_pct"] == round(100 * val[EPOCHS], 2)
    assert metrics["selected/test_acc_pct"] == round(100 * test[EPOCHS], 2)
    peak = min(e for e in val if val[e] == max(val.values()))
    assert (metrics["peak/epoch"], metrics["peak/val_acc_pct"]) == (peak, round(100 * val[peak], 2))
    assert not any(k.startswith(("best/", "final/")) for k in metrics), "one set of headline numbers"
    for key in ("system/images_per_s", "system/peak_rss_mb"):  # what each epoch cost, charted per epoch
        assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == list(range(1, EPOCHS + 1))
    assert "system/peak_gpu_memory_mb" not in metrics, "no GPU here: no GPU metric rather than a made-up one"
    assert not any(k.startswith(("sweep.", "ray.", "ablation.", "dissection.", "tracking.")) for k in params)
    assert "None" not in params.values(), "an unset setting is no parameter"
    assert "config.yaml" in {a.path for a in client.list_artifacts(child.info.run_id)}
    (dataset,) = client.get_run(child.info.run_id).inputs.dataset_inputs
    assert dataset.dataset.name == "shapes"
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("selected/")} == \
        {k: metrics[k] for k in ("selected/epoch", "selected/val_acc_pct", "selected/test_acc_pct")}, \
        "the study run's headline is its chosen trial's, the same keys and values"
    assert parent.data.tags["best_chosen_on"] == "val/acc"


def test_checkpoint_holds_model_optimizer_scheduler_epoch_and_config(uninterrupted):
    cfg, result = uninterrupted
    ck = load_checkpoint(f"{result.trials[0]['checkpoint_path']}/checkpoint.pt")
    assert ck["epoch"] == EPOCHS - 1
    assert ck["config"] == with_absolute_paths(cfg).dump(), "the config it trained with (data.root resolved)"
    assert ck["scheduler"]["last_epoch"] == EPOCHS
    assert ck["optimizer"]["state"], "momentum buffers are saved"
    assert not any(k.startswith("module.") for k in ck["model"])


def test_killed_worker_resumes_from_checkpoint_and_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    """The last worker SIGKILLs itself once at epoch 1; Ray Train restarts the group from epoch 0's checkpoint."""
    cfg_a, result_a = uninterrupted
    cfg = small_config(tmp_path, "train.fail_at_epoch=1", "train.max_failures=1")
    result = train(cfg, quiet=True)
    (trial,) = result.trials
    client = MlflowClient(cfg.tracking.mlflow_uri)
    history = client.get_metric_history(trial["run_id"], "test/acc")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), "every epoch logged exactly once"
    resumed, reference = final_weights(trial), final_weights(result_a.trials[0])
    for key in reference:
        assert torch.allclose(resumed[key].float(), reference[key].float(), rtol=1e-4, atol=1e-5), key
    assert trial["metrics"]["test/acc"] == pytest.approx(result_a.trials[0]["metrics"]["test/acc"], abs=1e-9)


def test_more_workers_than_the_cluster_can_place_is_refused_before_starting(ray_cluster, tmp_path):
    cfg = small_config(tmp_path, "train.num_workers=16")
    with pytest.raises(ConfigError, match="train.num_workers = 16 needs 17 CPUs"):
        train(cfg, quiet=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_use_gpu_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train(small_config(tmp_path, "train.use_gpu=true"), quiet=True)


def test_missing_dataset_offline_is_refused_before_starting(tmp_path):
    cfg = small_config(tmp_path, "data.name=cifar100", f"data.root={tmp_path}/nowhere")
    with pytest.raises(DataError, match="nowhere"):
        train(cfg, quiet=True)


def test_unwritable_storage_path_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    with pytest.raises(ConfigError, match="not writable"):
        train(small_config(tmp_path, f"ray.storage_path={blocker}/ray"), quiet=True)


def test_cli_train_user_error_is_one_line_exit_2(run_study, tmp_path):
    out = run_study("train", "--config", str(QUICKSTART), "--set", "data.name=cifar100",
                    "--set", f"data.root={tmp_path}/nowhere", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "CIFAR-100 was not found" in out.stderr


def test_a_relative_data_root_is_read_by_every_worker_where_the_driver_found_it(ray_cluster, tmp_path, monkeypatch):
    """Ray Train V2 runs its workers in directories of their own, so ``data.root=data`` must be resolved
    on the driver. The fabricated CIFAR-100 tree passes the driver's checksum check (its MD5s are patched
    in, in this process only), not a worker's: a worker that finds it stops at torchvision's integrity check
    ("incomplete or corrupted"); one that looks elsewhere says "was not found"."""
    from study.train import TrainingFailed

    from .test_data import fake_cifar100, official

    monkeypatch.chdir(tmp_path)
    fake_cifar100(tmp_path / "data")
    official(tmp_path / "data", monkeypatch)
    cfg = small_config(tmp_path, "data.name=cifar100", "data.root=data", "train.num_workers=1",
                       "train.max_failures=0", "train.epochs=1")
    with pytest.raises(TrainingFailed) as info:
        train(cfg, quiet=True)
    message = str(info.value)
    assert "incomplete or corrupted" in message and str(tmp_path / "data") in message, message
    assert "was not found" not in message
