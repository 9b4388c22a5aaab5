"""Verdicts only for significant effects, ties never broken by unit id, selections of fewer than k units.

Counts are built by hand from (lost, gained) per unit, so every expected value
below follows from McNemar's test and Benjamini-Hochberg as written in
analysis.stats, not from the code under test.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.counts import AblationCounts
from analysis.intervention import table1_interventions
from analysis.rankings import (
    best_units,
    class_accuracy,
    class_power,
    rank_units,
    rank_units_per_class,
    select_units,
    unit_power,
    worst_units,
)
from analysis.stats import mcnemar_mde
from trainables.errors import ConfigError

N, ERRORS = 1000, 20  # images (one class), baseline errors


def counts_of(lost: list[int], gained: list[int], n: int = N, errors: int = ERRORS) -> AblationCounts:
    """One class of ``n`` images, ``errors`` of them wrong at baseline; unit u loses lost[u] and gains gained[u]."""
    lost_t, gained_t = torch.tensor(lost)[:, None], torch.tensor(gained)[:, None]
    base = torch.tensor([n - errors])
    return AblationCounts("conv5_3", torch.arange(len(lost)), base[None] - lost_t + gained_t, torch.tensor([n]),
                          base, lost_t)


def test_only_significant_changes_get_a_verdict():
    # unit 0 loses 30 images (p ~ 2e-9), unit 1 gains 15 (p ~ 6e-5), unit 2 loses 3 (p 0.25), the rest nothing
    c = counts_of([30, 0, 3, 0, 0, 0], [0, 15, 0, 0, 0, 0])
    ranked = rank_units(c).set_index("unit")
    assert ranked.loc[0, "verdict"] == "useful" and ranked.loc[1, "verdict"] == "harmful"
    assert ranked.loc[2, "verdict"] == "neutral" and ranked.loc[2, "change"] < 0, "a loss the test cannot tell"
    assert set(ranked.loc[[3, 4, 5], "verdict"]) == {"neutral"}
    assert (ranked["verdict"] != "neutral").equals(ranked["q_value"] < 0.05)


def test_tied_units_share_a_rank_and_more_evidence_ranks_first():
    # units 1 and 3: -2 images from (2 lost, 0 gained), p 0.5; unit 2: -2 from (3, 1), p 0.625; units 0, 4: none
    ranked = rank_units(counts_of([0, 2, 3, 2, 0], [0, 0, 1, 0, 0]))
    assert list(ranked["unit"]) == [1, 3, 2, 0, 4]
    assert list(ranked["rank"]) == [1, 1, 3, 4, 4]


def test_a_selection_takes_only_units_that_move_accuracy_the_asked_way():
    c = counts_of([0, 4, 0, 1, 0, 0], [0, 0, 2, 0, 0, 0])
    assert best_units(c, 5).units == (1, 3) and best_units(c, 5).qualifying == 2
    assert worst_units(c, 5).units == (2,), "zero-change units are never drawn, however few qualify"
    shortfall = worst_units(c, 5).shortfall()
    assert shortfall.startswith("worst-5: 1 unit(s) whose removal raises accuracy") and "1 chosen" in shortfall
    assert best_units(c, 2).shortfall() is None and best_units(c, 2).label == "best-2"
    assert select_units(counts_of([0, 0], [0, 0]), 3, "best").units == ()


def test_a_tie_straddling_the_last_place_is_left_out_whole():
    # unit 5 loses 6; units 1, 2, 4 lose 2 each (same p); unit 3 loses 3 and gains 1 (same change, less evidence)
    c = counts_of([0, 2, 2, 3, 2, 6], [0, 0, 0, 1, 0, 0])
    two = best_units(c, 2)
    assert two.units == (5,) and two.tied == (1, 2, 4), "three units tie for one place: none is chosen"
    assert "tie for the last 1 place(s)" in two.shortfall()
    assert best_units(c, 4).units == (5, 1, 2, 4) and best_units(c, 4).tied == ()
    assert best_units(c, 5).units == (5, 1, 2, 4, 3), "the tie on change is broken by evidence (p)"
    with pytest.raises(ConfigError, match="direction must be"):
        select_units(c, 2, "middling")


def test_table1_runs_the_rows_of_the_units_that_qualify_and_skips_an_empty_selection():
    c = counts_of([0, 4, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0])  # no unit raises accuracy; two lower it
    plan = table1_interventions(worst_units(c, 5), best_units(c, 5), factors=(2.0,))
    assert {iv.selection for iv in plan} == {"best-2"} and {iv.units for iv in plan} == {(1, 3)}
    assert len(plan) == 4, "output and weight, divided and multiplied, for the best units only"


def test_per_class_lists_only_moved_units_with_verdicts_only_when_significant_and_the_class_power():
    c = counts_of([30, 0, 3, 0, 0, 0], [0, 15, 0, 0, 0, 0])
    per_class = rank_units_per_class(c, k=5)
    assert set(per_class["unit"]) == {0, 1, 2}, "no zero-change unit is listed"
    by_unit = per_class.set_index("unit")
    assert by_unit.loc[0, "direction"] == "lowers" and by_unit.loc[0, "verdict"] == "useful"
    assert by_unit.loc[1, "direction"] == "raises" and by_unit.loc[1, "verdict"] == "harmful"
    assert by_unit.loc[2, "verdict"] == "neutral"
    power = class_power(c).iloc[0]
    # two of six units rejected: one more would need p < 0.05 * 3 / 6
    drop, gain = mcnemar_mde(N, ERRORS, 0.05 * 3 / 6)
    assert power["level"] == pytest.approx(0.025) and power["mde_drop"] == pytest.approx(float(drop))
    assert np.allclose(per_class["mde_gain"], float(gain))
    overall = unit_power(c)
    assert (overall.images, overall.errors, overall.level) == (N, ERRORS, pytest.approx(0.025))
    assert np.isinf(unit_power(counts_of([0], [0], n=100, errors=3)).gain), "3 errors cannot show a gain"


def _summary(c: AblationCounts, n: int = 5) -> str:
    """``study ablate``'s console lines for counts ``c`` (no Ray: the fan-out and source are stand-ins)."""
    from study.ablate import AblationResult, ablation_summary

    ranked, tidy = rank_units(c), class_accuracy(c)
    fan_out = SimpleNamespace(results={}, computed=[], reused=[], precision=(0, 0))
    result = AblationResult(c, ranked, unit_power(c, ranked), class_power(c, tidy), int(tidy["significant"].sum()),
                            Path("out"), [], "run", SimpleNamespace(run_id=None), fan_out, None)
    return "\n".join(ablation_summary(result, n))


def test_the_console_names_only_significant_units_and_states_the_power_of_every_null():
    text = _summary(counts_of([30, 0, 3, 2, 2, 0], [0, 15, 0, 0, 0, 0]))
    assert "useful units (removal lowers accuracy): 0 (-3.00 pt, q " in text
    assert "harmful units (removal raises accuracy): 1 (+1.50 pt, q " in text
    named = re.findall(r"(\d+) \([+-]\d+\.\d+ pt, q", text)
    assert named == ["0", "1"], "units 2-4 lose images but not significantly; unit 5 changes nothing"
    drop, gain = mcnemar_mde(N, ERRORS, 0.05 * 3 / 6)
    assert (f"the other 4 units: no significant change; with 80% power the test on these {N} images detects a drop "
            f"of {100 * float(drop):.2f} pt (~{float(drop) * N:.0f} images) or a gain of {100 * float(gain):.2f} pt") in text
    assert "per class (1000 images each): 2 (unit, class) change(s) significant" in text

    quiet = _summary(counts_of([1, 0, 2], [0, 1, 0]))
    lines = [line for line in quiet.splitlines() if "significant" in line]
    assert lines[0].startswith("no unit's removal changes accuracy significantly (q < 0.05); with 80% power")
    assert not re.findall(r"\d+ \([+-]\d+\.\d+ pt, q", quiet), "nothing significant: no unit is named"


def test_the_console_never_splits_a_tie_to_fill_its_list():
    text = _summary(counts_of([40, 30, 30, 0], [0, 0, 0, 0]), n=2)
    assert "useful units (removal lowers accuracy): 0 (-4.00 pt" in text and "2 more in units_ranked.csv" in text
    assert not re.search(r"\b[12] \(-3\.00 pt", text), "units 1 and 2 tie for the second place: neither is named"
