"""Configuration: defaults -> preset -> YAML -> overrides, and one-line errors naming the key."""

import dataclasses

import pytest

from pipeline.config import ConfigError, load_config


def test_layering(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: apt\nattack: {eps: 2}\nloss: {lam: 3}\n")
    cfg = load_config(f, ["loss.lam=5", "optim.epochs=7"])
    assert cfg.prompt.design == "coop" and cfg.prompt.n_ctx_text == 16  # preset
    assert cfg.attack.eps == 2.0 and cfg.attack.steps == 3  # YAML over preset
    assert cfg.loss.lam == 5.0 and cfg.optim.epochs == 7  # overrides over YAML
    assert cfg.attack.eps_px == pytest.approx(2 / 255)


def test_frozen_and_replace():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss.lam = 3  # frozen
    assert cfg.replace(**{"loss.lam": 3}).loss.lam == 3.0 and cfg.loss.lam == 1.0


@pytest.mark.parametrize("override, culprit", [
    ("loss.lamda=1", "loss.lamda"),
    ("optim.epochs=two", "optim.epochs"),
    ("attack.eps=-1", "attack.eps"),
    ("method=nope", "method"),
    ("prompt.design=deep", "prompt.design"),
    ("eval.final_attacks=[pgd7]", "eval.final_attacks"),
    ("run.seed=true", "run.seed"),
])
def test_bad_values_name_the_key(override, culprit):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    msg = str(err.value)
    assert culprit in msg and "\n" not in msg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_every_method_preset_resolves():
    from pipeline.config import METHOD_PRESETS

    for name in METHOD_PRESETS:
        assert load_config(overrides=[f"method={name}"]).method == name
