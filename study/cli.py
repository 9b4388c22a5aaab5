"""The ``study`` command line.

Only verbs that work are registered. A user error (bad config, missing data,
unreadable checkpoint) prints one line to stderr and exits 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from trainables.errors import UnitstudyError

app = typer.Typer(
    help="unitstudy: FocusedDropout, input-gradient penalties and per-unit ablation of VGG-16 on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the typed configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (default: built-in defaults).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one field, e.g. --set train.epochs=3 (repeatable)."),
]


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration (file + overrides + defaults) as YAML."""
    from study.config import load_config

    cfg = load_config(config, set_)
    typer.echo(yaml.safe_dump(cfg.dump(), sort_keys=False).rstrip())


@data_app.command("summary")
def data_summary(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Load (or generate) the configured dataset and print its size, classes and concepts."""
    from study.config import load_config
    from trainables.datasets import dataset_spec

    cfg = load_config(config, set_)
    for line in dataset_spec(cfg.data.name).summary_lines(cfg.data):
        typer.echo(line)


@app.command("train")
def train_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train one model (Ray Train DDP inside a one-trial Tune study), logged to MLflow."""
    from study.config import load_config
    from study.mlflow_ui import ui_hint
    from study.train import train

    cfg = load_config(config, set_)
    result = train(cfg, config_path=str(config) if config else None)
    (trial,) = result.trials
    m = trial["metrics"]
    val = f"val/acc {m['val/acc']:.2%}, " if "val/acc" in m else ""
    typer.echo(
        f"done: train/acc {m['train/acc']:.2%}, {val}test/acc {m['test/acc']:.2%} after {int(m['epoch']) + 1} epochs; "
        f"MLflow parent run {result.parent_run_id}, trial run {trial['run_id']}"
    )
    typer.echo(f"checkpoint: {trial['checkpoint_path']}")
    typer.echo(f"see the trial: {ui_hint(cfg, trial['run_id'])}" if trial["run_id"]
               else f"see the runs: {ui_hint(cfg)}")


@app.command("sweep")
def sweep_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep from its storage.")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="Sweep name in storage (resume: default latest).")] = None,
) -> None:
    """Hyperparameter sweep: Optuna search or a method grid, ASHA, every trial a nested MLflow run."""
    from study.config import load_config
    from study.mlflow_ui import runs_hint, ui_hint
    from study.sweep import sweep

    cfg = load_config(config, set_)
    result = sweep(cfg, config_path=str(config) if config else None, resume=resume, name=name)
    done = [t for t in result.trials if t["error"] is None and "test/acc" in t["metrics"]]
    typer.echo(f"{len(done)}/{len(result.trials)} trials finished; MLflow parent run {result.parent_run_id}")
    metric, sign = cfg.sweep.metric, (-1 if cfg.sweep.mode == "max" else 1)
    for t in sorted(done, key=lambda t: sign * t["metrics"].get(metric, -sign * float("inf"))):
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["search"].items())
        val = f"val/acc {t['metrics']['val/acc']:.2%}  " if "val/acc" in t["metrics"] else ""
        mark = "  <- best (chosen on " + metric + ")" if result.best is t else ""
        typer.echo(f"  {val}test/acc {t['metrics']['test/acc']:.2%} after {int(t['metrics']['epoch']) + 1} epochs  "
                   f"{values}{mark}")
    for t in result.trials:
        if t["error"]:
            typer.echo(f"  trial {t['trial_id']} failed: {t['error']}", err=True)
    typer.echo(f"see the study: {ui_hint(cfg, result.parent_run_id)}")
    typer.echo(f"compare its trials: {ui_hint(cfg, trials_of=result.parent_run_id)}")
    typer.echo(f"every run of the experiment: {runs_hint(cfg)}")


CheckpointArg = Annotated[
    str, typer.Option("--checkpoint", help="A checkpoint.pt (or its folder), or the MLflow run id that logged one.")
]
LayerOpt = Annotated[Optional[str], typer.Option("--layer", help="Unit layer, e.g. conv5_3 (default: ablation.layer).")]
UnitsOpt = Annotated[Optional[str], typer.Option("--units", help="Only these units, e.g. 0,5,9 (default: all).")]


@app.command("ablate")
def ablate_cmd(
    checkpoint: CheckpointArg,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    layer: LayerOpt = None,
    units: UnitsOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: outputs/ablation-<run>).")] = None,
) -> None:
    """Remove each unit of a layer in turn and measure per-class test accuracy (Ray tasks; resumable)."""
    from study.ablate import ablation_summary, run_ablation
    from study.mlflow_ui import ui_hint

    result = run_ablation(checkpoint, config, set_, layer=layer, units=units, out=out)
    for line in ablation_summary(result):
        typer.echo(line)
    typer.echo(f"see the run: {ui_hint(result.cfg, result.run_id)}")


@app.command("intervene")
def intervene_cmd(
    checkpoint: CheckpointArg,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    layer: LayerOpt = None,
    units: Annotated[Optional[str], typer.Option("--units", help="Candidate units, e.g. 0,5,9 (default: all).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Worst and best units to intervene on.")] = None,
    factors: Annotated[Optional[str], typer.Option("--factors", help="Factors tried in order, e.g. 2,3.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: outputs/intervention-<run>).")] = None,
) -> None:
    """Table 1: damp or boost the worst/best units (selected on validation images), reported on test."""
    from study.intervene import intervention_summary, run_intervention
    from study.mlflow_ui import ui_hint

    result = run_intervention(checkpoint, config, set_, layer=layer, units=units, top_k=top_k, factors=factors,
                              out=out)
    for line in intervention_summary(result):
        typer.echo(line)
    typer.echo(f"see the run: {ui_hint(result.cfg, result.run_id)}")


@app.command("report")
def report_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    experiment: Annotated[Optional[str], typer.Option("--experiment", help="MLflow experiment (default: tracking.experiment).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default: outputs/report-<experiment>).")] = None,
) -> None:
    """Rebuild the paper's Table 2 from the runs in MLflow (mean +- 95% t interval over seeds, paired differences)."""
    from analysis.tables import TABLE2_CAPTION
    from study.config import load_config
    from study.mlflow_ui import ui_hint
    from study.report import report

    cfg = load_config(config, set_)
    r = report(cfg, experiment, out)
    typer.echo(TABLE2_CAPTION)
    typer.echo(r.markdown)
    for note in r.notes:
        typer.echo(note)
    if r.table1:
        typer.echo("\nTable 1: unit interventions (latest `study intervene` run)")
        typer.echo(r.table1)
    typer.echo(f"written to {r.out_dir}" + (f"; logged to MLflow run {r.logged_to}" if r.logged_to else ""))
    if r.logged_to:
        typer.echo(f"see it: {ui_hint(cfg, r.logged_to)}")


@app.command("quickstart")
def quickstart_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The whole pipeline offline: a short sweep, ablation and interventions of the best trial, the report."""
    from study.quickstart import quickstart

    default = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    quickstart(config or default, set_, echo=typer.echo)


@app.command("dissect")
def dissect_cmd(
    checkpoint: CheckpointArg,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="Unit layer, e.g. conv5_3 (default: dissection.layer).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: outputs/dissection-<layer>-<run>).")] = None,
    join: Annotated[bool, typer.Option("--join", help="Also ablate the layer's units (alone and in groups) and join that with the labels: units_joined.csv, groups_joined.csv.")] = False,
) -> None:
    """Network dissection: label each unit with the concept its top activations overlap best (Ray tasks)."""
    from study.dissect import dissection_summary, run_dissection
    from study.mlflow_ui import ui_hint

    result = run_dissection(checkpoint, config, set_, layer=layer, out=out, join=join)
    for line in dissection_summary(result):
        typer.echo(line)
    typer.echo(f"see the run: {ui_hint(result.cfg, result.run_id)}")


def quiet_libraries() -> None:
    """Keep the terminal for the kit's own lines: no INFO chatter or notices a user cannot act on.

    MLflow's database-setup INFO lines, artifact download bars and (against a server) the
    "View run ... at" line of every finished run (the kit prints its own links), Optuna's
    "new study created" line and its experimental-API warning. Warnings and
    errors of every library still show.
    """
    import logging
    import os
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run at" lines: ours carry the view
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*is experimental \(supported from")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user errors become one line on stderr and exit 2.

    Usage errors (unknown option, missing argument) are click's and also exit 2.
    """
    quiet_libraries()
    try:
        from study.jobs import job_note

        if note := job_note():  # inside a Ray job: say where the runs go instead of its temporary directory
            typer.echo(note, err=True)
        app(args=argv, prog_name="study")  # standalone: exits via SystemExit
    except UnitstudyError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
