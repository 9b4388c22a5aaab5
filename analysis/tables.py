"""The paper's Table 2 (accuracy per regularization method) from a DataFrame of runs.

Input: the frame ``mlflow.search_runs`` returns (columns ``params.<dotted path>``,
``metrics.<key>``, ``tags.<key>``), restricted to trial runs. Pure pandas/scipy:
no MLflow calls here.

Method of a run: the ``method`` tag when a grid set one (``configs/table2.yaml``),
otherwise read off its params: ``dropout`` (regularization.dropout.rate > 0),
``focused_dropout`` (par_rate > 0), ``input_gradient`` (lambda > 0), joined with
``+`` when several are on, ``baseline`` when none is.

Confidence interval: mean +- t_{0.975, n-1} * s / sqrt(n), s the sample standard
deviation over the runs (seeds) of one method; undefined (NaN) for n = 1, as the
paper's single runs are.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

METHOD_PARAMS = (
    ("dropout", "params.regularization.dropout.rate"),
    ("focused_dropout", "params.regularization.focused_dropout.par_rate"),
    ("input_gradient", "params.regularization.gradient_penalty.lambda"),
)


def method_of(row: pd.Series) -> str:
    tag = row.get("tags.method")
    if isinstance(tag, str) and tag:
        return tag
    on = [name for name, col in METHOD_PARAMS if float(row.get(col, 0) or 0) > 0]
    return "+".join(on) if on else "baseline"


def mean_ci(values: pd.Series, confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the t confidence interval, n); half-width NaN when n < 2."""
    v = values.dropna().astype(float).to_numpy()
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.nan, 1
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return float(v.mean()), float(half), n


def table2(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method: n, train/test accuracy mean and 95% CI half-width (fractions)."""
    if runs.empty:
        return pd.DataFrame(columns=["method", "n", "train_acc", "train_acc_ci", "test_acc", "test_acc_ci"])
    runs = runs.assign(method=runs.apply(method_of, axis=1))
    rows = []
    for method, group in runs.groupby("method", sort=False):
        train, train_ci, n = mean_ci(group["metrics.train/acc"])
        test, test_ci, _ = mean_ci(group["metrics.test/acc"])
        rows.append({"method": method, "n": n, "train_acc": train, "train_acc_ci": train_ci,
                     "test_acc": test, "test_acc_ci": test_ci})
    order = {"baseline": 0}
    table = pd.DataFrame(rows)
    return table.sort_values(by="method", key=lambda s: s.map(lambda m: (order.get(m, 1), m))).reset_index(drop=True)


def _pct(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.2f}%" + ("" if math.isnan(ci) else f" ± {100 * ci:.2f}")


def table2_markdown(table: pd.DataFrame) -> str:
    """Table 2 as Markdown, accuracies in percent with the 95% CI half-width."""
    lines = ["| method | n | train acc | test acc |", "|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.method} | {r.n} | {_pct(r.train_acc, r.train_acc_ci)} | {_pct(r.test_acc, r.test_acc_ci)} |")
    return "\n".join(lines)


def accuracy_figure(table: pd.DataFrame, path) -> None:
    """Test accuracy per method with 95% CI bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(table), 3.5))
    err = np.nan_to_num(table["test_acc_ci"].to_numpy(dtype=float) * 100)
    ax.bar(table["method"], table["test_acc"] * 100, yerr=err, capsize=4, color="#4c72b0")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy per method (mean, 95% CI over seeds)")
    ax.tick_params(axis="x", rotation=20)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parallel_coordinates_figure(runs: pd.DataFrame, path) -> None:
    """par_rate, dropout and lambda of every run, coloured by its test accuracy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [("par_rate", METHOD_PARAMS[1][1]), ("dropout", METHOD_PARAMS[0][1]), ("lambda", METHOD_PARAMS[2][1])]
    values = np.stack([runs[col].astype(float).to_numpy() for _, col in axes] +
                      [runs["metrics.test/acc"].astype(float).to_numpy()], axis=1)  # (runs, 4)
    lo, hi = values.min(0), values.max(0)
    scaled = (values - lo) / np.where(hi > lo, hi - lo, 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    cmap = plt.get_cmap("viridis")
    for row, acc in zip(scaled, scaled[:, -1]):
        ax.plot(range(4), row, color=cmap(acc), alpha=0.8)
    ax.set_xticks(range(4), [name for name, _ in axes] + ["test/acc"])
    for i in range(4):
        ax.annotate(f"{lo[i]:.3g}", (i, 0), textcoords="offset points", xytext=(2, -12), fontsize=7)
        ax.annotate(f"{hi[i]:.3g}", (i, 1), textcoords="offset points", xytext=(2, 4), fontsize=7)
    ax.set_yticks([])
    ax.set_title("Regularizer settings vs test accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
