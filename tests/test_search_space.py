"""Search-space YAML: validation before Ray starts, overrides on the whole file, conditional spaces."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from pipeline.config import ConfigError
from pipeline.search import cmd_search, main, register
from pipeline.search_space import DefineByRun, distributions, load_search, optuna_space

ROOT = Path(__file__).resolve().parent.parent
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


def doc(**space) -> dict:
    """A minimal valid search document with the given space."""
    return {"base": {"method": "capt", "model": {"name": "capt-tiny"}, "data": {"path": "demo"}},
            "search": {"name": "t", "num_samples": 2}, "space": space}


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_shipped_search_spaces_are_valid(path):
    spec = load_search(path)
    assert spec.space and spec.search.num_samples >= 1
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), f"{path.name} must start with a comment: how to run it and what it costs"


@pytest.mark.parametrize("space, match", [
    ({"loss.lamda": {"type": "float", "low": 0.1, "high": 1.0}}, r"space\.loss\.lamda: not a config key"),
    ({"prompt.depht": {"type": "int", "low": 1, "high": 3}}, r"space\.prompt\.depht"),
    ({"loss.lam": {"type": "float", "low": 2.0, "high": 2.0}}, r"space\.loss\.lam: empty range"),
    ({"loss.lam": {"type": "float", "low": 5.0, "high": 1.0}}, r"space\.loss\.lam: empty range"),
    ({"prompt.depth": {"type": "float", "low": 1.0, "high": 3.5}}, r"space\.prompt\.depth: value .* expected an integer"),
    ({"prompt.depth": {"type": "int", "low": 1, "high": 2.5}}, r"space\.prompt\.depth: high must be an integer"),
    ({"loss.alpha_rule": {"type": "categorical", "choices": ["fixed", "bogus"]}}, r"space\.loss\.alpha_rule: value 'bogus'"),
    ({"loss.lam": {"type": "normal", "low": 0, "high": 1}}, r"space\.loss\.lam: type must be"),
    ({"loss.lam": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, r"log scale needs low > 0"),
    ({"loss.lam": {"type": "float", "low": "a", "high": 1.0}}, r"space\.loss\.lam: low must be a number"),
    ({"loss.lam": {"type": "float", "low": 0.1, "high": 1.0, "lo": 1}}, r"space\.loss\.lam: unknown field 'lo'"),
    ({"loss.alpha": {"type": "float", "low": 0, "high": 1, "when": {"loss.alpha_rule": "fixed"}}},
     r"space\.loss\.alpha\.when: 'loss\.alpha_rule' is not a searched parameter"),
    ({"loss.alpha_rule": {"type": "categorical", "choices": ["fixed", "ratio"]},
      "loss.alpha": {"type": "float", "low": 0, "high": 1, "when": {"loss.alpha_rule": "fxed"}}},
     r"space\.loss\.alpha\.when: 'fxed' is not one of"),
    ({"loss.lam": {"type": "float", "low": 0.1, "high": 1},
      "loss.alpha": {"type": "float", "low": 0, "high": 1, "when": {"loss.lam": 0.5}}},
     r"must be an unconditional categorical"),
    ({"attack.eps": {"type": "categorical", "choices": [1.0, 4.0]}},
     r"space\.attack\.eps: the training eps is searched but base\.eval\.eps is not set"),
])
def test_bad_space_is_refused_naming_the_key(space, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_search(None, tree=doc(**space))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("over, match", [
    ({"search": {"name": "t", "num_samples": 0}}, r"num_samples"),
    ({"search": {"name": "t", "objectives": ["accuracy"]}}, r"search\.objectives"),
    ({"search": {"name": "t", "scheduler": {"type": "pbt"}}}, r"search\.scheduler\.type"),
    ({"search": {"name": "t", "resources": {"cpu": 1, "tpu": 1}}}, r"search\.resources"),
    ({"search": {"name": "t", "final_attacks": ["pgd1000"]}}, r"search\.final_attacks"),
    ({"search": {"name": "t", "num_sample": 2}}, r"unknown search key: search\.num_sample"),
    ({"search": {"name": "bad name/"}}, r"search\.name"),
    ({"search": {"name": "t", "points_to_evaluate": [{"prompt.depth": 2}]}}, r"points_to_evaluate\[0\]: 'prompt\.depth'"),
    ({"tracking": {"url": "x"}}, r"unknown tracking key: tracking\.url"),
    ({"base": {"optim": {"epoch": 3}}}, r"base: unknown config key: optim\.epoch"),
    ({"searh": {}}, r"unknown search-file section: searh"),
])
def test_bad_settings_are_refused(over, match):
    tree = {**doc(**{"loss.lam": {"type": "float", "low": 0.1, "high": 1.0}}), **over}
    with pytest.raises(ConfigError, match=match):
        load_search(None, tree=tree)


def test_overrides_reach_every_section_and_dotted_space_keys():
    spec = load_search(ROOT / "search_spaces" / "smoke.yaml", [
        "search.num_samples=2", "base.optim.epochs=1", "search.storage_path=/x", "tracking.uri=sqlite:////tmp/m.db",
        "space.attack.eps.choices=[0.0, 8.0]", "space.optim.lr=null",
        "space.prompt.depth={type: int, low: 1, high: 2}"])
    assert spec.search.num_samples == 2 and spec.search.storage_path == "/x"
    assert spec.base["optim"]["epochs"] == 1 and spec.tracking.uri == "sqlite:////tmp/m.db"
    assert spec.space["attack.eps"].choices == (0.0, 8.0)
    assert "optim.lr" not in spec.space and spec.space["prompt.depth"].high == 2
    with pytest.raises(ConfigError, match="override"):
        load_search(ROOT / "search_spaces" / "smoke.yaml", ["num_samples=2"])


def test_unconditional_space_gives_optuna_distributions():
    tree = doc(**{
        "loss.lam": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
        "prompt.depth": {"type": "int", "low": 1, "high": 4},
        "attack.eps": {"type": "categorical", "choices": [1.0, 2.0]}})
    tree["base"]["eval"] = {"eps": 1.0}  # searching the training eps needs one evaluation eps
    spec = load_search(None, tree=tree)
    d = distributions(spec)
    assert d["loss.lam"] == optuna.distributions.FloatDistribution(0.1, 10.0, log=True)
    assert d["prompt.depth"] == optuna.distributions.IntDistribution(1, 4)
    assert d["attack.eps"] == optuna.distributions.CategoricalDistribution([1.0, 2.0])
    cfg = spec.trial_config({"loss.lam": 2.0, "prompt.depth": 3})
    assert cfg.loss.lam == 2.0 and cfg.prompt.depth == 3


def test_conditional_parameter_is_sampled_only_when_its_parent_allows():
    spec = load_search(None, tree=doc(**{
        "loss.alpha_rule": {"type": "categorical", "choices": ["fixed", "ratio", "confidence"]},
        "loss.alpha": {"type": "float", "low": 0.0, "high": 1.0, "when": {"loss.alpha_rule": "fixed"}},
        "loss.lam": {"type": "float", "low": 0.1, "high": 10.0}}))
    space = optuna_space(spec)
    assert isinstance(space, DefineByRun)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: space(t) or 0.0, n_trials=30)
    seen = {t.params["loss.alpha_rule"] for t in study.trials}
    assert seen == {"fixed", "ratio", "confidence"}
    for t in study.trials:
        assert ("loss.alpha" in t.params) == (t.params["loss.alpha_rule"] == "fixed")
        spec.trial_config(t.params)  # every sampled combination is a valid config
    with pytest.raises(ValueError, match="conditional"):
        distributions(spec)


def test_config_error_exits_2_with_one_line(tmp_path, capsys):
    code = main(["--config", str(ROOT / "search_spaces" / "smoke.yaml"), "--set", f"search.out={tmp_path}",
                 "--set", "space.loss.lamb={type: float, low: 1, high: 2}"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "search: error: space.loss.lamb: not a config key (unknown config key: loss.lamb)"]
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_capt_search_subcommand_takes_the_same_arguments():
    import argparse

    parser = argparse.ArgumentParser(prog="capt")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["search", "--config", "x.yaml", "--set", "a=1", "--set", "b=2", "--resume"])
    assert args.func is cmd_search and args.set == ["a=1", "b=2"] and args.resume and args.config == "x.yaml"


def test_partial_point_in_an_unconditional_space_is_completed_from_the_base():
    """Ray's OptunaSearch refuses a short point in a distribution-dict space at search start; the searcher
    gets it completed with the base values, and a base value outside the searched range is refused."""
    from pipeline.search_algo import complete_points, make_searcher

    space = {"loss.lam": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
             "prompt.depth": {"type": "int", "low": 1, "high": 4}}
    tree = doc(**space)
    tree["base"]["prompt"] = {"depth": 3}
    tree["search"]["points_to_evaluate"] = [{"loss.lam": 2.0}]
    spec = load_search(None, tree=tree)
    assert complete_points(spec) == [{"loss.lam": 2.0, "prompt.depth": 3}]
    searcher = make_searcher(spec, optuna.storages.InMemoryStorage())
    searcher.set_search_properties(None, None, {})  # Ray's own check of the points runs here
    assert searcher.suggest("t0")["prompt.depth"] == 3
    tree["base"]["prompt"] = {"depth": 6}
    tree["search"]["points_to_evaluate"] = [{"loss.lam": 2.0}]
    tree["space"]["prompt.depth"]["high"] = 4
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\]: give 'prompt.depth'"):
        complete_points(load_search(None, tree=tree))
