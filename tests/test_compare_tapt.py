"""The TAPT stage of `capt compare`: the search of TAPT's settings (validation, candidates, the pick, the
rows it adds) and one end-to-end run whose candidates are scored on `val`, never on the test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.compare import load_compare
from pipeline.compare_tapt import (
    candidates,
    pick,
    search_cells,
    search_markdown,
    search_spec,
    searched_variant,
    tapt_cells,
)
from pipeline.config import ConfigError

from .test_compare_tuning import install_fake_demo

SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, "steps": {"type": "int", "low": 1, "high": 3}}


@pytest.fixture
def fake_demo(tmp_path: Path, monkeypatch) -> Path:
    """demo:fashion -> a small fake Fashion-MNIST shards folder: 20 test images, 10 `val` ones."""
    return install_fake_demo(tmp_path, monkeypatch, n_train=40, n_test=20)


@pytest.mark.parametrize("search, culprit", [
    ({"space": {}}, "tapt.search.space: nothing to search"),
    ({"space": SPACE, "budget": 3}, "tapt.search: expected a mapping with keys"),
    ({"space": {"lr": {"type": "float", "low": -1.0, "high": 1.0}}}, "tapt.search.space.lr: .*lr and weight must be >= 0"),
    ({"space": {"lr": {"type": "float", "low": 1.0, "high": 0.1}}}, "tapt.search.space.lr: empty range"),
    ({"space": SPACE, "objective": "robust_acc"}, "tapt.search.objective: 'robust_acc' is not one of"),
    ({"space": SPACE, "num_samples": 0}, "num_samples and limit must be >= 1"),
])
def test_search_section_is_validated(search, culprit) -> None:
    with pytest.raises(ConfigError, match=culprit):
        search_spec({"method": "best", "attack_steps": 20, "search": search}, attack_steps=20)


def test_search_split_is_never_the_test_split_and_must_exist(fake_demo: Path) -> None:
    plan = load_compare("configs/compare/fashion.yaml", [])
    assert plan["tapt_search"]["split"] == "val" and plan["tapt_search"]["objective"] == "adaptive_robust_acc"
    with pytest.raises(ConfigError, match="tapt.search.split: 'test' is the test split"):
        load_compare("configs/compare/fashion.yaml", ["tapt.search.split=test"])
    with pytest.raises(ConfigError, match="no split 'holdout'"):
        load_compare("configs/compare/fashion.yaml", ["tapt.search.split=holdout"])
    with pytest.raises(ConfigError, match="adaptive_robust_acc needs tapt.adaptive_steps >= 1"):
        load_compare("configs/compare/fashion.yaml", ["tapt.adaptive_steps=0"])


def test_candidates_start_from_the_published_settings_and_are_seeded() -> None:
    spec = search_spec({"lr": 5e-4, "search": {"space": SPACE, "num_samples": 5, "seed": 3}}, attack_steps=100)
    first = candidates(spec, {"lr": 5e-4})
    assert first[0] == {"lr": 5e-4, "steps": 1}  # the published values (steps: TaptConfig's default)
    assert len(first) == 5 and len({json.dumps(c, sort_keys=True) for c in first}) == 5
    assert all(1e-4 <= c["lr"] <= 1e-2 and c["steps"] in (1, 2, 3) for c in first[1:])
    assert candidates(spec, {"lr": 5e-4}) == first  # seeded
    other = search_spec({"search": {"space": SPACE, "num_samples": 5, "seed": 4}}, attack_steps=100)
    assert candidates(other, {"lr": 5e-4})[1:] != first[1:]


def _scored(i: int, objective: float | None, clean: float) -> dict:
    return {"tapt_search": i, "tapt_params": {"lr": 0.001 * (i + 1)}, "tapt_of": "capt-few_shot-s0",
            "metrics": {"adaptive_robust_acc": objective, "clean_acc": clean, "pgd20_acc": 0.5}}


def test_pick_takes_the_best_objective_then_clean_then_the_earliest() -> None:
    spec = search_spec({"search": {"space": SPACE}}, attack_steps=20)
    assert pick(spec, [_scored(0, 0.3, 0.6), _scored(1, 0.4, 0.5), _scored(2, float("nan"), 0.9)])["candidate"] == 1
    assert pick(spec, [_scored(0, 0.4, 0.5), _scored(1, 0.4, 0.7)])["candidate"] == 1  # tie: higher clean
    chosen = pick(spec, [_scored(2, 0.4, 0.7), _scored(1, 0.4, 0.7)])
    assert chosen["candidate"] == 1 and [r["candidate"] for r in chosen["candidates"]] == [1, 2]
    assert chosen["params"] == {"lr": 0.002} and chosen["prompts_of"] == "capt-few_shot-s0"
    note = search_markdown(chosen)
    assert "picked candidate 1, lr 0.002" in note and "| 2 | lr 0.003 | 40.0 | 70.0 |" in note
    with pytest.raises(RuntimeError, match="no candidate completed"):
        pick(spec, [])


def test_search_cells_tune_one_seeds_prompts_on_the_search_split(fake_demo: Path) -> None:
    plan = load_compare("configs/compare/fashion.yaml", [])
    trained = [{**c, "metrics": {"pgd20_acc": 0.5 if c["method"] == "fap" else 0.3}} for c in plan["cells"]]
    cells = search_cells(plan, trained, "pgd20_acc")
    spec = plan["tapt_search"]
    assert len(cells) == spec["num_samples"] and {c["tapt_of"] for c in cells} == {"fap-few_shot-s0"}
    assert all(c["tapt_opts"]["split"] == "val" and c["config"]["data"]["test_split"] == "val" for c in cells)
    assert cells[0]["tapt_opts"]["lr"] == 5e-4 and "search" not in cells[0]["tapt_opts"]  # published
    kept = {"candidate": 0, "params": {"lr": 5e-4, "steps": 1}}
    assert searched_variant(plan, kept) == {}  # the published settings won: their rows are `+tapt` already
    assert searched_variant(plan, {"candidate": 2, "params": {"lr": 0.003, "steps": 2}})["-searched"]["lr"] == 0.003
    assert "(the published settings: rows `+tapt`)" in search_markdown({**kept, "objective": "clean_acc",
        "images": 4, "split": "val", "prompts_of": "x", "candidates": []})
    rows = tapt_cells(plan, trained, "pgd20_acc", {"-searched": {**cells[0]["tapt_opts"], "lr": 0.003}})
    assert {c["method"] for c in rows} == {"fap+tapt", "fap+tapt-official", "fap+tapt-searched"} and len(rows) == 15
    assert all("split" not in c["tapt_opts"] or c["tapt_opts"]["split"] == "val" for c in rows)


def test_compare_runs_the_tapt_search_on_val_and_adds_the_searched_rows(fake_demo: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    from pipeline.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    f = tmp_path / "mini.yaml"
    f.write_text("""
base:
  model: {name: capt-tiny}
  data: {path: "demo:fashion", shots: 2}
  attack: {eps: 8.0}
  optim: {epochs: 1, batch_size: 10}
  eval: {attack: none, final_attacks: [pgd10], batch_size: 16}
methods: {capt: {prompt: {depth: 2}}}
seeds: [0]
protocols: [few_shot]
tapt:
  method: best
  views: 4
  tau: 0.5
  layers: [0, 1]
  attack_steps: 10
  adaptive_steps: 1
  limit: 3
  search: {num_samples: 2, split: val, limit: 2, seed: 0, objective: pgd10_acc,
           space: {lr: {type: float, low: 0.001, high: 0.1, log: true}}}
compare: {name: mini-tapt, table_attack: pgd10, resources: {cpu: 1, gpu: 0}, max_concurrent: 2}
""")
    import pipeline.compare as compare

    real_pick = compare.pick  # both candidates run; candidate 1's score is raised so that its rows run

    def favour_1(spec, scored):
        key = spec["objective"]
        return real_pick(spec, [{**c, "metrics": {**c["metrics"], key: c["metrics"][key] + (c["tapt_search"] == 1)}}
                                for c in scored])

    monkeypatch.setattr(compare, "pick", favour_1)
    out = tmp_path / "out"
    assert main(["compare", "--config", str(f), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {c["method"]: c["metrics"] for c in summary["cells"]}
    assert set(rows) == {"capt", "capt+tapt", "capt+tapt-searched"}
    for method in ("capt+tapt", "capt+tapt-searched"):
        assert rows[method]["tapt_images"] == 3 and rows[method]["tapt_pool_images"] == 20  # the test split
    assert [p.name for p in (out / "cells" / "capt-few_shot-s0").glob("tapt-stats-*.pt")] == ["tapt-stats-pgd-l0_1.pt"]
    chosen = summary["tapt_search"]
    assert chosen["candidate"] == 1 and chosen["params"]["lr"] != 5e-4
    assert len(chosen["candidates"]) == 2 and chosen["candidates"][0]["params"] == {"lr": 5e-4}
    assert chosen == json.loads((out / "tapt_search.json").read_text())
    table = (out / "table.md").read_text()
    assert "| capt+tapt-searched |" in table and "TAPT settings searched (2 candidates" in table
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mini-tapt").experiment_id])
    search_runs = [r for r in runs if (r.info.run_name or "").endswith("-val-s0")]  # capt+tapt-search<i>-val-s0
    assert len(search_runs) == 2  # every candidate is an MLflow child run
    assert all(r.data.metrics["tapt_pool_images"] == 10 and r.data.metrics["tapt_images"] == 2
               for r in search_runs)  # scored on the 10 `val` images, not the 20 test ones


def test_tapt_rows_are_compared_with_their_own_prompts_on_their_own_images() -> None:
    from pipeline.compare import _paired
    from pipeline.compare_tapt import tapt_gains, tapt_gains_markdown

    def tapt_row(seed: int, robust: float, base_robust: float) -> dict:
        return {"method": "capt+tapt", "protocol": "few_shot", "seed": seed, "tapt_of": f"capt-few_shot-s{seed}",
                "metrics": {"clean_acc": 0.7, "base_clean_acc_no_tapt": 0.7, "pgd20_acc": robust,
                            "adaptive_robust_acc": robust - 0.1, "base_robust_acc_no_tapt": base_robust}}

    rows = [tapt_row(0, 0.5, 0.4), tapt_row(1, 0.45, 0.4), tapt_row(2, 0.6, 0.4)]
    trained = [{"method": m, "protocol": "few_shot", "seed": s, "metrics": {"clean_acc": 0.9, "pgd20_acc": 0.2}}
               for m in ("capt", "fap") for s in range(3)]
    gains = {r["column"]: r for r in tapt_gains(trained + rows, "pgd20")}
    assert set(gains) == {"clean", "PGD-20", "adaptive (TAPT)"}
    assert gains["PGD-20"]["mean_diff"] == pytest.approx((0.1 + 0.05 + 0.2) / 3)  # seed by seed, same images
    assert gains["adaptive (TAPT)"]["mean_diff"] == pytest.approx(gains["PGD-20"]["mean_diff"] - 0.1)
    assert gains["clean"]["mean_diff"] == 0 and gains["clean"]["t_p"] == 1.0
    assert "minus the same trained prompts without TAPT" in tapt_gains_markdown(list(gains.values()))
    plan = {"settings": {"reference": "capt"}}
    paired = _paired(plan, trained + rows, ["capt", "fap", "capt+tapt"], "pgd20")
    assert {r["peer"] for r in paired} == {"fap"}  # TAPT rows are on other images: not paired with capt's


def test_tapt_statistics_are_computed_once_per_trained_cell(tmp_path: Path, monkeypatch) -> None:
    import torch

    import pipeline.attacks as attacks
    import pipeline.tapt_stats as ts
    from pipeline.compare_cell import tapt_stats

    calls = []

    def fake_compute(model, x, y, layers, *, attack, device, adv_images):
        calls.append(adv_images)
        t = [torch.full((3, 4), float(len(calls))) for _ in layers]
        return ts.TaptStats(tuple(layers), t, t, t, t, n_images=len(y))

    monkeypatch.setattr(ts, "compute_stats", fake_compute)
    monkeypatch.setattr(attacks, "build_attack", lambda *a, **k: None)
    task = type("T", (), {"train_x": torch.zeros(2), "train_y": torch.zeros(2)})()
    first = tapt_stats(None, task, 2.0, (0, 1), "pgd", tmp_path, "cpu")
    again = tapt_stats(None, task, 2.0, (0, 1), "pgd", tmp_path, "cpu")  # read back, not recomputed
    clean = tapt_stats(None, task, 2.0, (0, 1), "clean", tmp_path, "cpu")  # other images: computed
    assert calls == ["pgd", "clean"] and torch.equal(again.adv_mean[0], first.adv_mean[0])
    assert clean.adv_mean[0][0, 0] == 2.0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "tapt-stats-clean-l0_1.pt", "tapt-stats-pgd-l0_1.pt"]
