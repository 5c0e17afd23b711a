"""The Fashion-MNIST compare file and the fair-tuning stage (plans only: no training, no Ray here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import demo
from pipeline.compare import load_compare
from pipeline.compare_tuning import apply_tuned, run_tuning, tuning_notes
from pipeline.config import ConfigError, from_dict

from .test_fashion import _fake_idx


@pytest.fixture
def fake_demo(tmp_path: Path, monkeypatch) -> Path:
    return install_fake_demo(tmp_path, monkeypatch)


def install_fake_demo(tmp_path: Path, monkeypatch, n_train: int = 30, n_test: int = 10) -> Path:
    """demo:fashion / demo:digits -> a small fake Fashion-MNIST shards folder (with `val`: 1 image per
    class); capt-base -> a path."""
    from pipeline.fashion import shards_from_fashion

    _fake_idx(tmp_path / "idx", n_train=n_train, n_test=n_test)
    shards = tmp_path / "fashion"
    shards_from_fashion(shards, source=tmp_path / "idx", val_per_class=1, progress=False)
    monkeypatch.setitem(demo.DEMO_DATASETS, "demo:fashion", lambda: shards)
    monkeypatch.setitem(demo.DEMO_DATASETS, "demo:digits", lambda: shards)
    monkeypatch.setitem(demo.DEMO_MODELS, "capt-base", lambda: tmp_path / "capt-base.pt")
    return shards


def test_fashion_compare_file_resolves(fake_demo: Path) -> None:
    plan = load_compare("configs/compare/fashion.yaml", ["compare.out=/tmp/capt-never-written"])
    methods = {"zeroshot", "apt", "advvlp", "advmaple", "fap", "capt"}
    assert set(plan["methods"]) == methods and len(plan["cells"]) == 6 * 2 * 5
    few = next(c for c in plan["cells"] if c["method"] == "fap" and c["protocol"] == "few_shot")["config"]
    assert few["prompt"]["fap_layer0"] == "coupled" and few["data"]["shots"] == 16
    assert few["data"]["path"] == str(fake_demo) and few["model"]["checkpoint"].endswith("capt-base.pt")
    b2n = next(c for c in plan["cells"] if c["protocol"] == "base_to_new")["config"]
    assert b2n["data"]["classes"] == "base" and b2n["data"]["cross_datasets"] == []
    docs = plan["tuning"]
    assert set(docs) == methods - {"zeroshot"}  # nothing to tune without training
    assert {d["search"]["num_samples"] for d in docs.values()} == {8}  # the same budget for every method
    assert set(docs["capt"]["space"]) == {"optim.lr", "loss.lam"} and set(docs["apt"]["space"]) == {"optim.lr"}
    base = docs["capt"]["base"]
    assert base["data"]["test_split"] == "val" and base["run"]["seed"] == 100 and base["data"]["seed"] == 100
    assert base["data"]["cross_datasets"] == [] and base["method"] == "capt"
    assert base["eval"]["attack"] == "pgd" and few["eval"]["attack"] == "none"  # the monitor only while tuning


def test_tuning_never_on_the_test_split_and_needs_the_split(fake_demo: Path) -> None:
    with pytest.raises(ConfigError, match="is the test split"):
        load_compare("configs/compare/fashion.yaml", ["tuning.split=test"])
    with pytest.raises(ConfigError, match="no split 'holdout'"):
        load_compare("configs/compare/fashion.yaml", ["tuning.split=holdout"])
    with pytest.raises(ConfigError, match="space.optim.lrate"):
        load_compare("configs/compare/fashion.yaml", ["tuning.space={optim.lrate: {type: float, low: 0.1, high: 1}}"])
    with pytest.raises(ConfigError, match="needs a per-epoch monitor attack"):
        load_compare("configs/compare/fashion.yaml", ["tuning.overrides={}"])
    with pytest.raises(ConfigError, match="tuning: unknown key"):
        load_compare("configs/compare/fashion.yaml", ["tuning.budget=3"])


def test_run_tuning_applies_the_best_values_and_records_them(fake_demo: Path, tmp_path: Path, monkeypatch) -> None:
    import pipeline.search as search

    plan = load_compare("configs/compare/fashion.yaml", [f"compare.out={tmp_path / 'out'}"])
    seen = []

    def fake_search(spec):
        seen.append(spec)
        lr = 0.01 if spec.base["method"] == "capt" else 0.005
        return {"best": [{"params": {"optim.lr": lr}, "robust_acc": 0.4, "clean_acc": 0.6}],
                "counts": {"COMPLETE": 6, "PRUNED": 0, "FAIL": 0}}

    monkeypatch.setattr(search, "run_search", fake_search)
    chosen = run_tuning(plan["tuning"], tmp_path / "out")
    assert len(seen) == 5 and all(s.base["data"]["test_split"] == "val" for s in seen)
    assert (tmp_path / "out" / "tuning.json").is_file()
    cells = apply_tuned(plan["cells"], chosen)
    lrs = {(c["method"], c["protocol"]): from_dict(c["config"]).optim.lr for c in cells}
    assert lrs[("capt", "base_to_new")] == 0.01 and lrs[("apt", "few_shot")] == 0.005
    assert lrs[("zeroshot", "few_shot")] == from_dict(plan["cells"][0]["config"]).optim.lr  # untouched
    notes = tuning_notes(chosen)
    assert "- capt: optim.lr=0.01 (6 trials on `val`, seed 100, val robust 40.0%)" in notes


def test_tapt_variants_are_checked_and_become_methods(fake_demo: Path) -> None:
    from pipeline.compare_tapt import tapt_cells

    plan = load_compare("configs/compare/fashion.yaml", [])
    assert set(plan["tapt_variants"]) == {"", "-official"}
    official = plan["tapt_variants"]["-official"]
    assert official["reset"] == "official" and official["adv_images"] == "clean" and official["views"] == 16
    trained = [{**c, "metrics": {"pgd20_acc": 0.5 if c["method"] == "capt" else 0.1}} for c in plan["cells"]]
    cells = tapt_cells(plan, trained, "pgd20_acc")  # the file's table attack: the best by PGD-20
    assert {c["method"] for c in cells} == {"capt+tapt", "capt+tapt-official"} and len(cells) == 10
    assert all(c["tapt_of"].startswith("capt-few_shot-s") for c in cells)
    with pytest.raises(ConfigError, match="tapt variant official: .*reset"):
        load_compare("configs/compare/fashion.yaml", ["tapt.variants.official.reset=random"])
    with pytest.raises(ConfigError, match="tapt: adv_images"):
        load_compare("configs/compare/fashion.yaml", ["tapt.adv_images=fgsm"])
