"""The compare file's `checks` section and the table's robust attack (`compare.table_attack`)."""

from __future__ import annotations

import pytest

from pipeline import evaluate
from pipeline.compare import load_compare
from pipeline.compare_checks import best_peer, check_cells, checks_markdown
from pipeline.compare_table import aggregate, columns, honesty_problems, to_markdown
from pipeline.config import FINAL_ATTACKS, ConfigError

BASE = """
base: {eval: {final_attacks: [pgd20, pgd100]}}
methods: {zeroshot: {}, fap: {}, capt: {}}
seeds: [0, 1]
compare: {table_attack: pgd20}
"""


def _plan(tmp_path, extra=""):
    f = tmp_path / "c.yaml"
    f.write_text(BASE + extra)
    return load_compare(f, [])


def test_attack_names_agree():
    assert set(FINAL_ATTACKS) == set(evaluate.FINAL_ATTACKS)


@pytest.mark.parametrize("checks, culprit", [
    ("checks: {s: {methods: [nope], attacks: [pgd20]}}", "nope"),
    ("checks: {s: {attacks: [pgd7]}}", "pgd7"),
    ("checks: {s: {attacks: []}}", "at least one"),
    ("checks: {s: {attacks: [pgd20], seed: 9}}", "seed 9"),
    ("checks: {s: {attacks: [pgd20], limit: 0}}", "checks.s.limit"),
    ("checks: {s: {attacks: [pgd20], eps: [300]}}", "eps"),
    ("checks: {s: {attacks: [pgd20], steps: 3}}", "keys from"),
])
def test_check_validation(tmp_path, checks, culprit):
    with pytest.raises(ConfigError, match="checks.s") as err:
        _plan(tmp_path, checks)
    assert culprit in str(err.value) and "\n" not in str(err.value)


def test_table_attack_must_be_run_by_every_cell_and_by_tapt(tmp_path):
    with pytest.raises(ConfigError, match="pgd10 is not in eval.final_attacks of cell zeroshot-few_shot-s0"):
        _plan(tmp_path, "compare: {table_attack: pgd10}\n")
    with pytest.raises(ConfigError, match="'autoattack' is not one of"):
        _plan(tmp_path, "compare: {table_attack: autoattack}\n")
    with pytest.raises(ConfigError, match="tapt.attack_steps: 100 does not match compare.table_attack pgd20"):
        _plan(tmp_path, "tapt: {method: best}\n")
    assert _plan(tmp_path, "tapt: {method: best, attack_steps: 20, limit: 8}\n")["settings"]["table_attack"] == "pgd20"
    with pytest.raises(ConfigError, match="limit"):
        _plan(tmp_path, "tapt: {method: best, attack_steps: 20, limit: -1}\n")


def _cells(scores):
    return [{"method": m, "protocol": "few_shot", "seed": s, "key": f"{m}-few_shot-s{s}", "config": {},
             "metrics": {"clean_acc": 0.9, "pgd20_acc": v}} for (m, s), v in scores.items()]


def test_check_cells_resolve_best_peer_and_skip_missing(tmp_path):
    plan = _plan(tmp_path, "checks: {aa: {methods: [capt, best], attacks: [pgd100, autoattack], limit: 4}}\n")
    cells = _cells({("zeroshot", 0): 0.2, ("zeroshot", 1): 0.2, ("fap", 0): 0.5, ("fap", 1): 0.1,
                    ("capt", 0): 0.9, ("capt", 1): 0.9})
    assert best_peer(cells, "capt", "pgd20_acc") == "fap"  # mean 0.3 > 0.2; capt itself is not a peer
    made = check_cells(plan["checks"], cells, "capt", "pgd20_acc")
    assert [(c["method"], c["check_of"], c["protocol"]) for c in made] == [
        ("capt", "capt-few_shot-s0", "check:aa"), ("fap", "fap-few_shot-s0", "check:aa")]
    missing = [c for c in cells if c["key"] != "capt-few_shot-s0"]  # capt's seed-0 cell failed
    assert [c["method"] for c in check_cells(plan["checks"], missing, "capt", "pgd20_acc")] == ["fap"]


def test_checks_feed_the_honesty_rules_and_the_notes():
    good = {"clean_acc": 0.8, "pgd20_acc": 0.5, "pgd100_acc": 0.45, "autoattack_acc": 0.4, "check_images": 16.0}
    cell = {"method": "capt", "protocol": "check:aa", "seed": 0, "config": {"attack": {"eps": 2.0}}, "metrics": good}
    assert honesty_problems([cell]) == []
    bad = {**cell, "metrics": {**good, "autoattack_acc": 0.47}}  # above PGD-100 on the same images
    assert honesty_problems([bad]) == ["capt/check:aa/seed0: AutoAttack 0.470 > PGD-100 0.450"]
    rising = {**cell, "metrics": {**good, "pgd20_acc_eps4": 0.6}}
    assert "pgd20_acc rises with eps: 0.500 at 2 < 0.600 at 4" in honesty_problems([rising])[0]
    md = checks_markdown([cell])
    assert "aa (seed 0, 16 test images)" in md and "| capt | 80.0 | 45.0 | 50.0 | 40.0 |" in md
    assert md.index("clean_acc") < md.index("pgd100_acc") < md.index("autoattack_acc")


def test_table_columns_follow_the_table_attack():
    cells = _cells({("capt", 0): 0.5, ("capt", 1): 0.7})
    rows = aggregate(cells, ["capt"], columns("pgd20"))
    md = to_markdown(rows, spread="std")
    assert "| PGD-20 |" in md and "PGD-100" not in md and "60.0 ± 14.1" in md
