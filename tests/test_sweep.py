"""`study sweep`: Optuna search and grids over the train trial, ASHA, nested MLflow runs, resume."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from mlflow.tracking import MlflowClient

from study.config import load_config
from study.sweep import sweep
from trainables.errors import ConfigError

from .conftest import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def sweep_config(tmp_path, *extra):
    return load_config(QUICKSTART, [*sweep_config_overrides(tmp_path), *extra])


def child_runs(cfg, parent_id):
    c = MlflowClient(cfg.tracking.mlflow_uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    return c, c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.fixture(scope="module")
def four_trials(ray_cluster, mlflow_server, tmp_path_factory):
    """A four-trial Optuna sweep (fifo, 2 epochs) logged to the session's `mlflow server` (whose UI the view
    test opens, so no second server starts): (cfg, result)."""
    uri, _ = mlflow_server
    cfg = sweep_config(tmp_path_factory.mktemp("four"), "sweep.num_samples=4", "sweep.scheduler=fifo",
                       f"tracking.mlflow_uri={uri}", "tracking.experiment=sweep-view")
    return cfg, sweep(cfg, quiet=True)


SWEPT = {"par_rate": "regularization.focused_dropout.par_rate", "dropout.rate": "regularization.dropout.rate",
         "lambda": "regularization.gradient_penalty.lambda"}


def test_four_trial_optuna_sweep_logs_four_children_under_one_parent(four_trials):
    cfg, result = four_trials
    assert len(result.trials) == 4 and all(t["error"] is None for t in result.trials)
    c, children = child_runs(cfg, result.parent_run_id)
    assert len(children) == 4
    sampled = set()
    for run in children:
        p = run.data.params
        sampled.add(tuple(p[k] for k in SWEPT))
        assert not set(SWEPT.values()) & set(p), "a swept value under one key: its short one"
        assert json.loads(run.data.tags["swept"]) == SWEPT
        history = c.get_metric_history(run.info.run_id, "test/acc")
        assert sorted(m.step for m in history) == [1, 2]
    assert len(sampled) == 4, "Optuna drew different values for every trial"
    assert len({r.data.tags["mlflow.runColor"] for r in children}) == 4, "each trial drawn in its own colour"
    parent = c.get_run(result.parent_run_id)
    best = max(result.trials, key=lambda t: t["metrics"]["val/acc"])
    assert parent.data.metrics["selected/val_acc_pct"] == round(100 * best["metrics"]["val/acc"], 2), \
        "chosen on validation accuracy"
    assert parent.data.metrics["selected/test_acc_pct"] == round(100 * best["metrics"]["test/acc"], 2), \
        "its test accuracy is reported"
    assert parent.data.tags["best_trial_id"] == best["trial_id"] and result.best is best
    figures = {a.path for a in c.list_artifacts(result.parent_run_id, "figures")}
    assert figures == {"figures/optimization_history.png", "figures/param_importances.png"}
    assert any(k.startswith("importance/") for k in parent.data.metrics)
    assert parent.data.tags["param_importances"] == "from the 4 trials that ran all 2 epochs; fewer than 5: not reliable"


def chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


class _HeaderCells(HTMLParser):
    """The runs table's header cells: (aria-colindex, col-id, width in px) of every ag-grid header cell."""

    def __init__(self):
        super().__init__()
        self.cells = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "ag-header-cell" in (a.get("class") or "").split() and "col-id" in a:
            width = re.search(r"width: (\d+)px", a.get("style") or "")
            self.cells.append((int(a.get("aria-colindex", 0)), a["col-id"], int(width.group(1)) if width else None))


@pytest.mark.skipif(chromium() is None, reason="needs chromium (.ci/run installs it: apt-get install chromium)")
def test_the_printed_trials_view_opens_with_the_swept_values_and_accuracies_first(four_trials, tmp_path):
    """The link `study sweep` prints, opened in headless Chromium at 1600 px on the tracking server the sweep
    logged to: the runs table's first columns are the swept values, then selected val and test accuracy, at the
    view's widths, every trial a row. The screenshot stays under tmp_path (looked at when this was written)."""
    from study.mlflow_ui import trials_view, trials_view_key, ui_hint

    cfg, result = four_trials
    page = ui_hint(cfg, trials_of=result.parent_run_id)  # what `study sweep` prints: the server is the UI
    assert trials_view_key(result.parent_run_id) in page and "workflowType=machine_learning" in page
    for attempt in range(2):  # the server's first page load can outlast the virtual time on a busy machine
        out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                              f"--user-data-dir={tmp_path}/chromium", "--window-size=1600,1000",
                              "--virtual-time-budget=20000", f"--screenshot={tmp_path}/view.png", "--dump-dom",
                              page], capture_output=True, text=True, timeout=180)
        cells = _HeaderCells()
        cells.feed(out.stdout)
        if any(c.startswith("params.") for _, c, _ in cells.cells):
            break
    columns = sorted((i, c, w) for i, c, w in cells.cells if c.startswith(("params.", "metrics.", "tags.")))
    assert [c for _, c, _ in columns][:5] == ["params.`par_rate`", "params.`dropout.rate`", "params.`lambda`",
                                               "metrics.`selected/val_acc_pct`", "metrics.`selected/test_acc_pct`"], \
        out.stdout[-3000:]
    widths = trials_view(result.parent_run_id, list(SWEPT.values()))["columnWidths"]
    assert {c: w for _, c, w in columns} == {c: widths[c] for _, c, _ in columns}, "at the view's widths"
    assert all(f"trial-{t['trial_id']}" in out.stdout for t in result.trials), "every trial is a row"
    assert (tmp_path / "view.png").stat().st_size > 20_000, "a screenshot of the page, not a blank one"


def test_asha_stops_a_weak_trial_and_the_next_trial_still_runs(ray_cluster, tmp_path):
    """Grid lr = [~0, 0.02, ~0, 0.02], one trial at a time, ASHA rung at epoch 1 with reduction factor 2.

    Trial 3 (lr ~0) repeats trial 1 exactly (same seed, the weights do not move), so
    at the rung it sits below the median of {trial 1, trial 2} because trial 2 learned
    (about 15% vs 5% test accuracy after one epoch of 94 steps); ASHA must stop it,
    and trial 4 must then still get its resources (the placement-group leak of
    DESIGN.md would hang it).
    """
    cfg = sweep_config(
        tmp_path, "data.num_train=3000", "data.num_test=400", "train.batch_size=32",
        "sweep.space={}", "sweep.grid={train.lr: [1.0e-9, 0.02, 1.0e-9, 0.02]}", "sweep.scheduler=asha",
        "sweep.grace_period=1", "sweep.reduction_factor=2", "sweep.max_concurrent_trials=1", "sweep.num_samples=1",
        "regularization.focused_dropout.par_rate=0",
    )
    result = sweep(cfg, quiet=True)
    by_lr = {}
    for t in result.trials:
        by_lr.setdefault(t["config"]["train"]["lr"], []).append(t)
    frozen, learning = by_lr[1e-9], by_lr[0.02]
    epochs = sorted(int(t["metrics"]["epoch"]) + 1 for t in frozen)
    assert epochs == [1, 2], "the second frozen trial was stopped after its first epoch"
    assert [int(t["metrics"]["epoch"]) + 1 for t in learning] == [2, 2], "both learning trials ran to the end"
    c, children = child_runs(cfg, result.parent_run_id)
    assert sorted(r.data.tags["status"] for r in children) == ["finished"] * 3 + ["stopped_early"]


def test_grid_of_methods_and_seeds_tags_each_trial_with_its_method(ray_cluster, tmp_path):
    cfg = sweep_config(
        tmp_path, "train.epochs=1", "train.t_max=1", "sweep.space={}", "sweep.scheduler=fifo", "sweep.num_samples=1",
        "sweep.methods={baseline: {}, dropout: {regularization.dropout.rate: 0.2}}", "sweep.seeds=[0, 1]",
        "regularization.focused_dropout.par_rate=0",
    )
    result = sweep(cfg, quiet=True)
    c, children = child_runs(cfg, result.parent_run_id)
    seen = sorted((r.data.tags["method"], r.data.params["train.seed"], r.data.params["dropout.rate"])
                  for r in children)
    assert seen == [("baseline", "0", "0.0"), ("baseline", "1", "0.0"), ("dropout", "0", "0.2"), ("dropout", "1", "0.2")]


def _trial(trial_id, val_acc, test_acc, val_loss=1.0, error=None):
    return {"trial_id": trial_id, "error": error, "search": {},
            "metrics": {"val/acc": val_acc, "val/loss": val_loss, "test/acc": test_acc}}


def test_the_best_trial_is_chosen_on_validation_even_when_test_ranks_another_first():
    from study.train import choose_best

    trials = [_trial("a", 0.70, 0.90, val_loss=0.9), _trial("b", 0.80, 0.60, val_loss=0.5),
              _trial("c", 0.75, 0.95, val_loss=0.4), _trial("d", 0.99, 0.99, error="boom")]
    assert choose_best(trials, "val/acc", "max")["trial_id"] == "b", "highest val/acc, not highest test/acc"
    assert choose_best(trials, "val/loss", "min")["trial_id"] == "c"
    assert choose_best([t for t in trials if t["error"]], "val/acc", "max") is None, "a failed trial is never best"
    with pytest.raises(ConfigError, match="validation metric"):
        choose_best(trials, "test/acc", "max")


def test_a_search_without_a_validation_split_is_refused_before_ray_starts(run_study, tmp_path):
    out = run_study("sweep", "--config", str(QUICKSTART), "--set", "data.val_fraction=0", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: an Optuna search (sweep.space) chooses on the validation split, but data.val_fraction = 0 holds "
        "none out; set data.val_fraction (e.g. 0.1), or run a grid with sweep.scheduler=fifo"]
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def sweep_config_overrides(tmp_path):
    return [
        "data.num_train=1500", "data.num_test=300", "model.width=0.125", "train.epochs=2", "train.t_max=2",
        "train.cpus_per_worker=1", "sweep.grace_period=1",
        "train.batch_size=64", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=sweeptest",
        f"ray.storage_path={tmp_path}/ray",
    ]


def test_resume_without_a_sweep_is_one_clear_error(ray_cluster, tmp_path):
    with pytest.raises(ConfigError, match="no sweep to resume"):
        sweep(sweep_config(tmp_path), resume=True, quiet=True)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("sweep.space={regularization.dropout.rat: {type: uniform, low: 0, high: 1}}", "not a config field"),
        ("sweep.space={regularization.dropout.rate: {type: uniform, low: 0.6, high: 0.1}}", "must not exceed"),
        ("sweep.space={regularization.gradient_penalty.lambda: {type: loguniform, low: 0, high: 1}}", "low > 0"),
        ("sweep.space={tracking.experiment: {type: uniform, low: 0, high: 1}}", "not numeric"),
    ],
)
def test_bad_search_space_is_refused_before_ray_starts(run_study, tmp_path, override, needle):
    out = run_study("sweep", "--config", str(QUICKSTART), "--set", override, cwd=tmp_path)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_summary_uses_the_space_the_trials_were_drawn_from_not_the_edited_config(tmp_path):
    """After --resume Tune keeps its stored param space; rebuilding Optuna's study from the
    current (edited) config would refuse the stored trials' values."""
    from study.sweep import optuna_study
    from study.train import StudyResult

    original = sweep_config(tmp_path, "sweep.space={regularization.dropout.rate: {type: uniform, low: 0, high: 0.5}}")
    edited = sweep_config(tmp_path, "sweep.space={regularization.dropout.rate: {type: uniform, low: 0, high: 0.3}}")
    trials = [
        {"config": original.dump(), "error": None, "metrics": {"val/acc": acc},
         "search": {"regularization.dropout.rate": rate}}
        for rate, acc in ((0.45, 0.2), (0.1, 0.3))
    ]
    study = optuna_study(edited, StudyResult(parent_run_id="p", experiment_path="x", trials=trials))
    assert sorted(t.params["regularization.dropout.rate"] for t in study.trials) == [0.1, 0.45]


def test_importances_compare_only_trials_run_to_the_last_epoch(tmp_path):
    """ASHA hands stopped trials to Optuna as complete with their epoch-10 value: comparing those with
    30-epoch values would make the learning curve look like a parameter's effect."""
    from study.sweep import full_fidelity, optuna_study
    from study.train import StudyResult

    cfg = sweep_config(tmp_path, "train.epochs=30")
    trials = [
        {"config": cfg.dump(), "error": None, "metrics": {"val/acc": acc, "epoch": last},
         "search": {"regularization.focused_dropout.par_rate": rate, "regularization.dropout.rate": 0.05,
                    "regularization.gradient_penalty.lambda": 0.0}}
        for rate, acc, last in ((0.05, 0.99, 29), (0.10, 0.30, 9), (0.12, 0.25, 9), (0.01, 0.97, 29))
    ]
    result = StudyResult(parent_run_id="p", experiment_path="x", trials=trials)
    assert [full_fidelity(cfg, t) for t in trials] == [True, False, False, True]
    assert len(optuna_study(cfg, result).trials) == 4
    full = optuna_study(cfg, result, full_only=True)
    assert sorted(t.values[0] for t in full.trials) == [0.97, 0.99]
