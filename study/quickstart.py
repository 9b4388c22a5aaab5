"""``study quickstart``: the whole pipeline, offline, in one command.

A short sweep on the generated shapes data, then per-unit ablation, the
Table 1 interventions and network dissection of the best trial's checkpoint,
then the report. Every
step is an ordinary command's function, so every run lands in MLflow exactly as
it would from the separate commands.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from study.config import load_config
from trainables.errors import UnitstudyError


def quickstart(
    config_path: str | Path,
    overrides: Sequence[str] | None = None,
    *,
    echo: Callable[[str], None] = print,
    quiet: bool = False,
) -> dict:
    """Run sweep -> ablate -> intervene -> dissect -> report; returns what each step produced."""
    from analysis.tables import TABLE2_CAPTION
    from study.ablate import ablation_summary, run_ablation
    from study.dissect import dissection_summary, run_dissection
    from study.intervene import intervention_summary, run_intervention
    from study.mlflow_ui import runs_hint, ui_hint
    from study.report import report
    from study.sweep import sweep

    cfg = load_config(config_path, overrides)
    t0 = time.perf_counter()

    echo(f"== 1/5 sweep: {cfg.sweep.num_samples} trials of {cfg.train.epochs} epochs on {cfg.data.name}")
    swept = sweep(cfg, config_path=str(config_path), quiet=quiet)
    best = swept.best
    if best is None or not best["run_id"]:
        raise UnitstudyError("no sweep trial finished with a validation score to choose on; see the errors above")
    m = best["metrics"]
    echo(f"best trial {best['trial_id']} (chosen on {cfg.sweep.metric}), at its selected epoch {int(m['epoch']) + 1} "
         f"(its last, whose checkpoint the analyses read): val/acc {m['val/acc']:.2%}, test/acc {m['test/acc']:.2%} "
         f"(MLflow run {best['run_id']})")

    echo(f"== 2/5 ablation of every {cfg.ablation.layer} unit of the best trial")
    ablated = run_ablation(best["run_id"], config_path, overrides, quiet=quiet)
    for line in ablation_summary(ablated):
        echo(line)

    echo("== 3/5 interventions on the worst and best units (Table 1)")
    intervened = run_intervention(best["run_id"], config_path, overrides, quiet=quiet)
    for line in intervention_summary(intervened):
        echo(line)

    size = cfg.dissection.image_size or cfg.data.image_size
    echo(f"== 4/5 network dissection of {cfg.dissection.layer} on {cfg.dissection.num_images} shapes images "
         f"of {size} px, joined with the ablation")
    dissected = run_dissection(best["run_id"], config_path, overrides, quiet=quiet, join=ablated.counts)
    for line in dissection_summary(dissected):
        echo(line)

    echo("== 5/5 report")
    r = report(cfg)
    echo(TABLE2_CAPTION)
    echo(r.markdown)
    for note in r.notes:
        echo(note)
    echo(f"quickstart finished in {time.perf_counter() - t0:.0f} s")
    echo(f"compare the sweep's trials: {ui_hint(cfg, trials_of=swept.parent_run_id)}")
    echo(f"the best trial and its analyses: {ui_hint(cfg, best['run_id'])}")
    echo(f"every run of the experiment: {runs_hint(cfg)}")
    return {"sweep": swept, "best": best, "ablation": ablated, "intervention": intervened, "dissection": dissected,
            "report": r}
