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
    import time

    from study.config import load_config
    from trainables import data as D

    cfg = load_config(config, set_)
    d = cfg.data
    t0 = time.perf_counter()
    if d.name == "places365":
        train = D.places365_dataset(d.root, True, d.download, d.image_size, False)
        test = D.places365_dataset(d.root, False, d.download, d.image_size, False)
        typer.echo(f"places365 under {d.root}: {len(train)} train, {len(test)} val images, {len(train.classes)} classes")
        return
    dump = cfg.dump()["data"]
    train_x, train_y = D.load_arrays(dump, train=True)
    test_x, _ = D.load_arrays(dump, train=False)
    seconds = time.perf_counter() - t0
    counts = train_y.bincount(minlength=cfg.num_classes)
    typer.echo(
        f"{d.name}: {train_x.shape[0]} train + {test_x.shape[0]} test images of "
        f"{tuple(train_x.shape[1:])} uint8, {cfg.num_classes} classes "
        f"({counts.min().item()}-{counts.max().item()} train images per class), loaded in {seconds:.1f} s"
    )
    if d.name == "shapes":
        for category in D.CATEGORIES:
            typer.echo(f"  {category} concepts: {', '.join(D.CONCEPTS[category])}")


@app.command("train")
def train_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train one model (Ray Train DDP inside a one-trial Tune study), logged to MLflow."""
    from study.config import load_config
    from study.tracking import ui_hint
    from study.train import train

    cfg = load_config(config, set_)
    result = train(cfg, config_path=str(config) if config else None)
    (trial,) = result.trials
    m = trial["metrics"]
    typer.echo(
        f"done: test/acc {m['test/acc']:.2%}, train/acc {m['train/acc']:.2%} after {int(m['epoch']) + 1} epochs; "
        f"MLflow parent run {result.parent_run_id}, trial run {trial['run_id']}"
    )
    typer.echo(f"checkpoint: {trial['checkpoint_path']}")
    typer.echo(f"see the runs: {ui_hint(cfg)}")


@app.command("sweep")
def sweep_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep from its storage.")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="Sweep name in storage (resume: default latest).")] = None,
) -> None:
    """Hyperparameter sweep: Optuna search or a method grid, ASHA, every trial a nested MLflow run."""
    from study.config import load_config
    from study.sweep import sweep
    from study.tracking import ui_hint

    cfg = load_config(config, set_)
    result = sweep(cfg, config_path=str(config) if config else None, resume=resume, name=name)
    done = [t for t in result.trials if t["error"] is None and "test/acc" in t["metrics"]]
    typer.echo(f"{len(done)}/{len(result.trials)} trials finished; MLflow parent run {result.parent_run_id}")
    for t in sorted(done, key=lambda t: -t["metrics"]["test/acc"]):
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["search"].items())
        typer.echo(f"  test/acc {t['metrics']['test/acc']:.2%} after {int(t['metrics']['epoch']) + 1} epochs  {values}")
    for t in result.trials:
        if t["error"]:
            typer.echo(f"  trial {t['trial_id']} failed: {t['error']}", err=True)
    typer.echo(f"see the runs: {ui_hint(cfg)}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user errors become one line on stderr and exit 2.

    Usage errors (unknown option, missing argument) are click's and also exit 2.
    """
    try:
        app(args=argv, prog_name="study")  # standalone: exits via SystemExit
    except UnitstudyError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
