"""Statistics of the results table: t-intervals, paired tests of CAPT against each peer, Holm."""

from __future__ import annotations

import math

import pytest

from pipeline.compare_stats import holm, paired_comparisons, paired_markdown, paired_test, t_interval
from pipeline.compare_table import aggregate, ci95, to_markdown


def _cell(method, seed, clean, protocol="few_shot"):
    return {"method": method, "protocol": protocol, "seed": seed, "metrics": {"clean_acc": clean}}


def test_t_interval_by_hand():
    m, h, n = t_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    # sd = sqrt(0.025) = 0.158114; t_{0.975, 4} = 2.776445
    assert (m, n) == (pytest.approx(0.3), 5) and h == pytest.approx(2.776445 * 0.158114 / math.sqrt(5), rel=1e-5)
    assert math.isnan(t_interval([0.4])[1]) and t_interval([None, float("nan")])[2] == 0


def test_paired_test_by_hand_and_wilcoxon_floor():
    a, b = [0.50, 0.52, 0.49, 0.55, 0.51], [0.45, 0.50, 0.47, 0.50, 0.48]
    r = paired_test(a, b)
    d = [x - y for x, y in zip(a, b, strict=True)]  # 0.05 0.02 0.02 0.05 0.03
    md = sum(d) / 5
    sd = math.sqrt(sum((x - md) ** 2 for x in d) / 4)
    t = md / (sd / math.sqrt(5))
    assert r["mean_diff"] == pytest.approx(md) and r["n"] == 5
    assert r["ci_low"] < md < r["ci_high"] and r["ci_low"] > 0
    from scipy import stats
    assert r["t_p"] == pytest.approx(2 * stats.t.sf(t, 4))
    assert r["t_p"] < 0.01
    assert r["wilcoxon_p"] == pytest.approx(0.0625)  # 5 seeds, all positive: 2 / 2**5, never below 0.05
    same = paired_test([0.5, 0.6], [0.5, 0.6])
    assert same["t_p"] == 1.0 and same["wilcoxon_p"] == 1.0
    with pytest.raises(ValueError):
        paired_test([0.1], [0.1, 0.2])


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.2, float("nan")])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1])


def test_paired_comparisons_pair_by_seed_and_name_the_tests():
    cells = [_cell("capt", s, 0.6 + 0.01 * s) for s in range(5)]
    cells += [_cell("apt", s, 0.5 + 0.01 * s + (0.002 if s % 2 else -0.002)) for s in range(5)]
    cells += [_cell("fap", s, 0.6 + 0.01 * s + (0.01 if s % 2 else -0.01)) for s in (0, 1, 2, 3)]  # seed 4 missing
    recs = paired_comparisons(cells, "capt", ["capt", "apt", "fap"], [("few_shot", "clean_acc", "clean")])
    apt, fap = (next(r for r in recs if r["peer"] == p) for p in ("apt", "fap"))
    assert apt["n"] == 5 and apt["mean_diff"] == pytest.approx(0.1 + 0.0004, abs=1e-9) and apt["significant"]
    assert fap["seeds"] == [0, 1, 2, 3] and abs(fap["mean_diff"]) < 1e-9 and not fap["significant"]
    assert apt["t_p_holm"] == pytest.approx(min(1.0, 2 * apt["t_p"]))  # the smaller of two p-values, doubled
    md = paired_markdown(recs)
    assert "paired t-test" in md and "Wilcoxon signed-rank" in md and "+10.04" not in md
    assert "| clean | apt | 5 | +10.0 |" in md


def test_table_with_95_percent_intervals():
    cells = [_cell("capt", s, v) for s, v in enumerate([0.1, 0.2, 0.3, 0.4, 0.5])]
    rows = aggregate(cells, ["capt"])
    assert ci95(rows[0]["clean"]) == pytest.approx(t_interval([0.1, 0.2, 0.3, 0.4, 0.5])[1])
    assert "| capt | 30.0 ± 19.6 |" in to_markdown(rows, spread="ci95")
    assert "| capt | 30.0 ± 15.8 |" in to_markdown(rows)


def test_honesty_accuracy_falls_with_eps():
    from pipeline.compare_table import honesty_problems

    cell = {"method": "capt", "protocol": "few_shot", "seed": 0, "config": {"attack": {"eps": 2.0}, "eval": {}},
            "metrics": {"clean_acc": 0.9, "pgd100_acc": 0.5, "pgd100_acc_eps1": 0.6, "pgd100_acc_eps4": 0.3,
                        "base_pgd100_acc": 0.4, "base_pgd100_acc_eps4": 0.2}}
    assert honesty_problems([cell]) == []
    cell["metrics"]["pgd100_acc_eps4"] = 0.55  # above the eps-2 figure
    problems = honesty_problems([cell])
    assert len(problems) == 1 and "pgd100_acc rises with eps: 0.500 at 2 < 0.550 at 4" in problems[0]
    cell["metrics"]["pgd100_acc_eps4"] = 0.3
    cell["metrics"]["base_pgd100_acc_eps4"] = 0.45
    assert "base_pgd100_acc rises with eps" in honesty_problems([cell])[0]
