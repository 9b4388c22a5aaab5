"""The paper's Table 2 (accuracy per regularization method) from a DataFrame of runs.

Input: the frame ``mlflow.search_runs`` returns (columns ``params.<dotted path>``,
``metrics.<key>``, ``tags.<key>``), restricted to trial runs. Pure pandas/scipy:
no MLflow calls here. Runs logged before trials reported ``val/acc`` lack that
column (or hold NaN there); their val accuracy reads "-".

Method of a run: the ``method`` tag when a grid set one (``configs/table2.yaml``),
otherwise read off its params: ``dropout`` (regularization.dropout.rate > 0),
``focused_dropout`` (par_rate > 0), ``input_gradient`` (lambda > 0), joined with
``+`` when several are on, ``baseline`` when none is. A row pools the runs of one
method AND one setting of its values (:func:`setting_of`), i.e. repeats over
seeds; a search's trials, which differ in their values, each get their own row,
labelled with the values when the method has several.

Accuracy columns: mean +- the 95% Student t half-width over the runs (seeds) of
one method (:func:`analysis.stats.paired_t_interval` applied to the values); no
interval for n = 1, as the paper's single runs are.

Difference from the baseline: a method's run and the baseline run of the same
``train.seed`` share initialisation and data order, so they form a pair; the
column is the mean of ``test_acc(method) - test_acc(baseline)`` over the common
seeds with its paired 95% t half-width and the number of pairs. A seed run
several times within one method counts once, at the mean of its runs.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.stats import paired_t_interval

METHOD_PARAMS = (
    ("dropout", "params.regularization.dropout.rate"),
    ("focused_dropout", "params.regularization.focused_dropout.par_rate"),
    ("input_gradient", "params.regularization.gradient_penalty.lambda"),
)
SHORT = {"dropout": "dropout", "focused_dropout": "par_rate", "input_gradient": "lambda"}
BASELINE = "baseline"
SEED = "params.train.seed"
ACCURACIES = (("train_acc", "metrics.train/acc"), ("val_acc", "metrics.val/acc"), ("test_acc", "metrics.test/acc"))
COLUMNS = ["method", "n"] + [f"{name}{suffix}" for name, _ in ACCURACIES for suffix in ("", "_ci", "_n")] + [
    "test_diff", "test_diff_ci", "pairs"]
HEADER = "| method | n | train acc | val acc | test acc | Δ test acc vs baseline |"
TABLE2_CAPTION = (
    "Table 2: accuracy per method at each trial's selected epoch (its last, whose checkpoint is kept), in %. "
    "n: the trial runs pooled in the row (the seeds of one setting); each accuracy is their mean ± the 95% Student t "
    "half-width over them, with no ± when n < 2; (n=k): only k of the row's n runs logged that accuracy; "
    "-: none did (val acc: no validation split). Δ test acc vs baseline: the row's runs paired with the baseline "
    "runs of the same train.seed, mean ± 95% t half-width over the pairs, in percentage points (pt); -: no pair "
    "(the baseline row itself, or no baseline run of a shared seed). Only trials that ran every epoch are pooled."
)


def method_of(row: pd.Series) -> str:
    """The run's method: its ``method`` tag, else the regularizers its params switch on (module docstring)."""
    tag = row.get("tags.method")
    if isinstance(tag, str) and tag:
        return tag
    on = [name for name, col in METHOD_PARAMS if float(row.get(col, 0) or 0) > 0]
    return "+".join(on) if on else BASELINE


def setting_of(row: pd.Series) -> str:
    """The regularizer values of a run, e.g. ``dropout 0.05, par_rate 0.12``: runs that share it (and
    differ in ``train.seed`` only) are repeats of one setting; runs that do not are never pooled."""
    values = [(name, float(row.get(col, 0) or 0)) for name, col in METHOD_PARAMS]
    return ", ".join(f"{SHORT[name]} {v:.3g}" for name, v in values if v > 0) or "none"


def mean_ci(values: pd.Series, confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the t confidence interval, n) of ``values``, NaNs dropped; half-width NaN when n < 2."""
    return paired_t_interval(values.astype(float).to_numpy(), confidence)


def _metric(runs: pd.DataFrame, column: str) -> pd.Series:
    """The metric column as floats; all NaN when no run logged it."""
    if column not in runs:
        return pd.Series(math.nan, index=runs.index)
    return runs[column].astype(float)


def _per_seed_test_acc(runs: pd.DataFrame) -> pd.Series:
    """seed -> test accuracy (mean over the runs of that seed), for runs that logged both."""
    if SEED not in runs:
        return pd.Series(dtype=float)
    acc = pd.DataFrame({"seed": runs[SEED], "acc": _metric(runs, "metrics.test/acc")}).dropna()
    return acc.groupby("seed")["acc"].mean()


def paired_difference(runs: pd.DataFrame, baseline: pd.DataFrame, confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, t half-width, pairs) of test_acc(run) - test_acc(baseline run) over the seeds both have."""
    diffs = (_per_seed_test_acc(runs) - _per_seed_test_acc(baseline)).dropna()  # aligned on seed
    return paired_t_interval(diffs.to_numpy(), confidence)


def _row(method: str, group: pd.DataFrame, baseline: pd.DataFrame | None) -> dict[str, object]:
    """One Table 2 row: n, each accuracy's (mean, half-width, count), the paired difference from ``baseline``."""
    row: dict[str, object] = {"method": method, "n": len(group)}
    for name, column in ACCURACIES:
        row[name], row[f"{name}_ci"], row[f"{name}_n"] = mean_ci(_metric(group, column))
    compared = baseline is not None and method != BASELINE
    row["test_diff"], row["test_diff_ci"], row["pairs"] = (
        paired_difference(group, baseline) if compared else (math.nan, math.nan, 0))
    return row


def table2(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method (baseline first): n runs; train/val/test accuracy mean, 95% t half-width and
    count (fractions); the paired test-accuracy difference from the baseline, its half-width and pairs."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    runs = runs.assign(method=runs.apply(method_of, axis=1), setting=runs.apply(setting_of, axis=1))
    baseline = runs[runs["method"] == BASELINE] if (runs["method"] == BASELINE).any() else None
    several = runs.groupby("method")["setting"].nunique()
    rows = []
    for (method, setting), group in runs.groupby(["method", "setting"], sort=False):
        label = f"{method} ({setting})" if several[method] > 1 else method
        rows.append(_row(label, group, baseline if method != BASELINE else None))
    table = pd.DataFrame(rows)
    order = {BASELINE: 0}
    return table.sort_values(by="method", key=lambda s: s.map(lambda m: (order.get(m, 1), m))).reset_index(drop=True)


def _pct(mean: float, ci: float, count: int, n: int) -> str:
    """"72.00% ± 4.97", with "(n=k)" when only k of the row's n runs logged the value."""
    if math.isnan(mean):
        return "-"
    text = f"{100 * mean:.2f}%" + ("" if math.isnan(ci) else f" ± {100 * ci:.2f}")
    return text + ("" if count == n else f" (n={count})")


def _diff(mean: float, ci: float, pairs: int) -> str:
    """"+0.61 ± 0.40 pt (n=3 pairs)" in percentage points; "-" with no pair."""
    if pairs == 0:
        return "-"
    text = f"{100 * mean:+.2f}" + ("" if math.isnan(ci) else f" ± {100 * ci:.2f}")
    return f"{text} pt (n={pairs} pair{'s' if pairs > 1 else ''})"


def table2_markdown(table: pd.DataFrame) -> str:
    """Table 2 as Markdown: accuracies in percent with the 95% t half-width, the paired difference in points."""
    lines = [HEADER, "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        accs = " | ".join(_pct(getattr(r, name), getattr(r, f"{name}_ci"), getattr(r, f"{name}_n"), r.n)
                          for name, _ in ACCURACIES)
        lines.append(f"| {r.method} | {r.n} | {accs} | {_diff(r.test_diff, r.test_diff_ci, r.pairs)} |")
    return "\n".join(lines)


def accuracy_title(table: pd.DataFrame) -> str:
    """Title of :func:`accuracy_figure`: claims an interval only when some method has n >= 2 test accuracies."""
    what = "Test accuracy per method" if len(table) > 1 else f"Test accuracy of {table['method'].iloc[0]}"
    if (table["test_acc_n"] < 2).all():
        return f"{what}\n(single runs, no interval)"
    return f"{what}\n(mean, 95% t interval over seeds where n ≥ 2)"


def accuracy_figure(table: pd.DataFrame, path) -> None:
    """Test accuracy per method as points, 95% t interval bars only where n >= 2, each labelled with its n (PNG).

    Points, not bars from 0: the accuracies of interest differ by a few points near the top of the scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.style.use("default")  # optuna's plots switch the whole process to ggplot
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(table), 3.5))
    acc = table["test_acc"].to_numpy(dtype=float) * 100
    err = table["test_acc_ci"].to_numpy(dtype=float) * 100
    x = np.arange(len(table))
    ax.plot(x, acc, "o", color="#4c72b0")
    with_ci = (table["test_acc_n"].to_numpy() >= 2) & ~np.isnan(err)
    if with_ci.any():  # no interval and no cap is drawn for n < 2
        ax.errorbar(x[with_ci], acc[with_ci], yerr=err[with_ci], fmt="none", capsize=4, color="#4c72b0")
    for xi, a, n in zip(x, acc, table["test_acc_n"]):
        ax.annotate(f"{a:.2f}% (n={n})", (xi, a), textcoords="offset points", xytext=(8, -3), fontsize=8)
    spread = np.nan_to_num(np.where(with_ci, err, 0))
    lo, hi = np.nanmin(acc - spread), np.nanmax(acc + spread)
    pad = max(0.5, 0.15 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_xlim(-0.5, len(table) - 0.5 + 0.6)
    ax.set_xticks(x, table["method"], rotation=20 if len(table) > 1 else 0)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(accuracy_title(table))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parallel_coordinates_figure(runs: pd.DataFrame, path, stopped: pd.DataFrame | None = None) -> None:
    """par_rate, dropout and lambda of every run against its test accuracy (PNG).

    ``runs`` (solid lines) ran every epoch; ``stopped`` (dashed), when given, were
    stopped early (ASHA) and show their last test accuracy. Colour is test
    accuracy (colour bar); each axis is scaled to its own range (labelled).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    plt.style.use("default")  # optuna's plots switch the whole process to ggplot

    stopped = stopped if stopped is not None else runs.iloc[0:0]
    both = pd.concat([runs, stopped])
    axes = [("par_rate", METHOD_PARAMS[1][1]), ("dropout", METHOD_PARAMS[0][1]), ("lambda", METHOD_PARAMS[2][1])]

    def column(frame: pd.DataFrame, col: str) -> np.ndarray:
        return frame[col].astype(float).to_numpy() if col in frame else np.zeros(len(frame))

    values = np.stack([column(both, col) for _, col in axes] + [column(both, "metrics.test/acc")], axis=1)
    lo, hi = np.nanmin(values, 0), np.nanmax(values, 0)
    scaled = (values - lo) / np.where(hi > lo, hi - lo, 1)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(vmin=100 * lo[-1], vmax=100 * max(hi[-1], lo[-1] + 1e-9))
    for i, (row, acc) in enumerate(zip(scaled, values[:, -1])):
        ax.plot(range(4), row, color=cmap(norm(100 * acc)), alpha=0.85, linestyle="-" if i < len(runs) else "--")
    ax.set_xticks(range(4), [name for name, _ in axes] + ["test/acc"])
    for i in range(4):
        unit = 100 if i == 3 else 1
        ax.annotate(f"{unit * lo[i]:.3g}", (i, 0), textcoords="offset points", xytext=(2, -12), fontsize=7)
        ax.annotate(f"{unit * hi[i]:.3g}", (i, 1), textcoords="offset points", xytext=(2, 4), fontsize=7)
    ax.set_yticks([])
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="test accuracy (%)")
    handles = [Line2D([], [], color="grey", label=f"ran every epoch ({len(runs)})")]
    if len(stopped):
        handles.append(Line2D([], [], color="grey", linestyle="--", label=f"stopped early, last epoch ({len(stopped)})"))
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.set_title(f"Regularizer settings vs test accuracy ({len(both)} trials; each axis spans its own range)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
