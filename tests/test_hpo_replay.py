"""A tiny tabular replay (benchmarks/hpo_replay.py) through the product's searcher and scheduler: pruned
trials reach Optuna as PRUNED, finished ones as COMPLETE, and the anytime curve never decreases."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from hpo_replay import (  # noqa: E402
    STRATEGIES,
    Table,
    anytime_best,
    anytime_hypervolume,
    compute_to,
    hypervolume,
    replay,
    strategy_spec,
)

from pipeline.config import read_yaml  # noqa: E402

EPOCHS = 4


def made_up_table() -> Table:
    """8 configurations; robust accuracy grows with lr and lam, curves rise with the epochs."""
    grid = {"optim.lr": [0.002, 0.02], "loss.lam": [0.3, 3.0], "prompt.depth": [1, 3]}
    rows = []
    for lr, lam, depth in itertools.product(*grid.values()):
        level = 0.2 + 0.3 * (lr > 0.01) + 0.2 * (lam > 1) + 0.05 * (depth > 1)
        curve = [{"epoch": e, "robust_acc": round(level * e / EPOCHS, 4), "clean_acc": round(1 - level / 2, 4),
                  "epoch_time_s": 1.0 + 0.1 * depth} for e in range(1, EPOCHS + 1)]
        rows.append({"params": {"optim.lr": lr, "loss.lam": lam, "prompt.depth": depth}, "status": "ok",
                     "curve": curve})
    return Table({"grid": grid, "epochs": EPOCHS, "rows": rows})


@pytest.fixture(scope="module")
def doc() -> dict:
    tree = read_yaml(ROOT / "search_spaces" / "demo.yaml")
    tree["base"]["optim"]["epochs"] = EPOCHS
    return tree


def test_snap_picks_the_nearest_grid_point() -> None:
    table = made_up_table()
    snapped = table.snap({"optim.lr": 0.005, "loss.lam": 1.5, "prompt.depth": 2}, {"optim.lr", "loss.lam"})
    assert snapped == {"optim.lr": 0.002, "loss.lam": 3.0, "prompt.depth": 1}  # log: 0.005 nearer 0.002


@pytest.mark.parametrize("name", ["random+asha", "tpe+asha"])
def test_replay_prunes_through_optuna_and_curve_never_decreases(doc: dict, name: str) -> None:
    table = made_up_table()
    spec = strategy_spec(doc, table, STRATEGIES[name], seed=3, num_samples=8)
    assert spec.search.scheduler["type"] == "asha" and spec.search.max_concurrent == 2
    rep = replay(spec, table)
    states = {t.number: t.state for t in rep.study.trials}
    pruned = [f for f in rep.trials if f["state"] == "PRUNED"]
    complete = [f for f in rep.trials if f["state"] == "COMPLETE"]
    assert len(rep.trials) == 8 and pruned and complete  # ASHA (demo.yaml: grace 2, rf 2) stops some of 8 trials
    assert all(f["epochs"] < EPOCHS for f in pruned) and all(f["epochs"] == EPOCHS for f in complete)
    assert sorted(s.name for s in states.values()) == sorted(f["state"] for f in rep.trials)
    assert list(states.values()).count(optuna.trial.TrialState.PRUNED) == len(pruned)
    for t in rep.study.trials:  # a COMPLETE trial's value is its final robust accuracy from the table
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert 0 < t.value <= 0.75
    budget = EPOCHS * 8
    curve = anytime_best(rep, budget)
    assert np.all(np.diff(curve) >= 0) and curve[-1] == max(f["robust_acc"] for f in complete)
    assert sum(f["epochs"] for f in rep.trials) == rep.events[-1]["cum_epochs"] < budget  # ASHA saved compute
    assert compute_to(curve, curve[-1]) <= rep.events[-1]["cum_epochs"]


def test_budget_cuts_trials_and_two_objectives_give_a_front(doc: dict) -> None:
    table = made_up_table()
    spec = strategy_spec(doc, table, STRATEGIES["tpe+asha 2-obj"], seed=0, num_samples=50)
    rep = replay(spec, table, budget=20)
    assert rep.events[-1]["cum_epochs"] == 20
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in rep.study.trials)
    hv = anytime_hypervolume(rep, 20, ref=(0.0, 0.0))
    assert np.all(np.diff(hv) >= 0) and hv[-1] > 0
    assert hypervolume([(1.0, 0.5), (0.5, 1.0), (0.4, 0.4)], (0.0, 0.0)) == pytest.approx(0.75)


def test_random_without_asha_runs_every_trial_in_full(doc: dict) -> None:
    table = made_up_table()
    rep = replay(strategy_spec(doc, table, STRATEGIES["random"], seed=1, num_samples=5), table)
    assert [f["epochs"] for f in rep.trials] == [EPOCHS] * 5
    first = rep.study.trials[0].params  # demo.yaml's point first, completed with the base's lr
    assert first["loss.lam"] == 1.0 and first["prompt.depth"] == 2 and "optim.lr" in first
    assert [t.state.name for t in rep.study.trials] == ["COMPLETE"] * 5


def test_sampler_setting_builds_the_sampler_and_rejects_bad_values(doc: dict) -> None:
    from pipeline.config import ConfigError
    from pipeline.search_algo import make_searcher
    from pipeline.search_space import load_search

    for kind, cls in (("random", optuna.samplers.RandomSampler), ("grid", optuna.samplers.GridSampler),
                      ("tpe", optuna.samplers.TPESampler)):
        spec = load_search(None, [f"search.sampler.type={kind}"], tree=doc)
        searcher = make_searcher(spec, optuna.storages.InMemoryStorage()).searcher
        assert isinstance(searcher._sampler, cls)
    for bad, culprit in (("search.sampler.type=bayes", "search.sampler.type"),
                         ("search.sampler.n_startup_trials=-1", "search.sampler.n_startup_trials"),
                         ("search.sampler.grid={nope: [1]}", "search.sampler.grid"),
                         ("search.sampler.colour=1", "search.sampler.colour")):
        with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
            load_search(None, [bad], tree=doc)
