"""TAPT: views, view selection, statistics, per-image reset, AdamW, batched == sequential, adaptive attack, CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from pipeline.attacks import build_attack
from pipeline.config import ConfigError, PromptConfig
from pipeline.prompts import PromptedCLIP
from pipeline.tapt import (
    AdamWState,
    Tapt,
    TaptConfig,
    TaptEvalConfig,
    adamw_init,
    adamw_step,
    adaptive_attack,
    evaluate_tapt,
    select_confident,
    tune_sequential,
)
from pipeline.tapt_stats import (
    TaptStats,
    compute_stats,
    layer_moments,
    load_stats,
    make_views,
    parse_layers,
    resolve_layers,
    save_stats,
    token_shape,
    view_generators,
)

from .conftest import CLASSES, TEMPLATES, toy_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tiny_clip, design: str, depth: int = 3) -> PromptedCLIP:
    torch.manual_seed(1)
    return PromptedCLIP(tiny_clip, PromptConfig(design=design, depth=depth), CLASSES, TEMPLATES)


def _random_stats(model: PromptedCLIP, layers=(0, 1, 2, 3)) -> TaptStats:
    t, d = token_shape(model)
    g = torch.Generator().manual_seed(3)

    def mk(var: bool) -> list[torch.Tensor]:
        return [torch.rand(t, d, generator=g) if var else torch.randn(t, d, generator=g) for _ in layers]

    return TaptStats(tuple(layers), mk(False), mk(True), mk(False), mk(True), 10)


# ----------------------------------------------------------------------------- views and selection


def test_views_shape_original_range_and_seeding():
    x = torch.rand(2, 3, 32, 32)
    v = make_views(x, 16, view_generators(0, [0, 1]))
    assert v.shape == (2, 16, 3, 32, 32)
    assert torch.equal(v[:, 0], x)
    assert v.min() >= 0 and v.max() <= 1
    again = make_views(x, 16, view_generators(0, [0, 1]))
    assert torch.equal(v, again)
    other = make_views(x, 16, view_generators(1, [0, 1]))
    assert not torch.allclose(v[:, 1:], other[:, 1:])
    alone = make_views(x[1:], 16, view_generators(0, [1]))  # views depend on the image index, not the batch
    assert torch.equal(alone[0], v[1])


def test_full_crop_without_flip_is_identity_and_flip_mirrors():
    x = torch.rand(1, 3, 8, 8)
    g = view_generators(0, [0])
    v = make_views(x, 64, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # every crop is the whole image
    for view in v[0, 1:]:
        assert torch.allclose(view, x[0], atol=1e-6) or torch.allclose(view, x[0].flip(-1), atol=1e-6)


def test_keep_counts():
    assert TaptConfig().keep == 6  # the official int(64 * 0.1)
    assert TaptConfig(rounding="ceil").keep == 7
    assert TaptConfig(views=8, tau=0.1).keep == 1  # at least one view
    assert TaptConfig(views=10, tau=0.3, rounding="ceil").keep == 3


def test_confident_selection_keeps_lowest_entropy_views():
    # entropies: view 0 uniform (high), 1 very peaked, 2 peaked, 3 uniform, 4 fairly peaked
    logits = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 5.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    assert select_confident(logits, 2).tolist() == [1, 2]
    cfg = TaptConfig(views=5, tau=0.5, rounding="ceil")  # ceil(2.5) = 3
    assert sorted(select_confident(logits, cfg.keep).tolist()) == [1, 2, 4]
    batched = select_confident(torch.stack([logits, logits.flip(0)]), 1)
    assert batched.tolist() == [[1], [3]]


# ----------------------------------------------------------------------------- statistics


def test_stats_match_direct_computation(tiny_clip, tmp_path):
    model = _model(tiny_clip, "ivlp")
    x, y = toy_images(2, seed=5)  # 8 images, in batches of 3
    batches = [(x[i:i + 3], y[i:i + 3]) for i in range(0, 8, 3)]
    means, variances, n = layer_moments(model, batches, [0, 2])
    with torch.no_grad():
        _, cap = model.image_features(x, capture=[0, 2])
    assert n == 8
    for m, v, tokens in zip(means, variances, cap, strict=True):
        assert m.shape == tokens.shape[1:] == token_shape(model)
        torch.testing.assert_close(m, tokens.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, tokens.var(0, correction=0), rtol=1e-4, atol=1e-5)
    stats = TaptStats((0, 2), means, variances, [m + 1 for m in means], [v * 2 for v in variances], n)
    path = save_stats(tmp_path / "s.pt", stats)
    raw = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in raw.values())
    back = load_stats(path)
    assert back.layers == (0, 2) and back.n_images == 8
    for a, b in zip(stats.clean_var + stats.adv_mean, back.clean_var + back.adv_mean, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="not in the statistics file"):
        back.select([1])
    with pytest.raises(ConfigError, match="not found"):
        load_stats(tmp_path / "missing.pt")


def test_layers_resolution():
    assert resolve_layers(None, 12) == tuple(range(8))
    assert resolve_layers(None, 4) == (0, 1, 2, 3)  # published 0..7 clipped to a 4-block encoder
    assert parse_layers("0-2,5") == (0, 1, 2, 5)
    with pytest.raises(ConfigError, match="4 blocks"):
        resolve_layers((0, 7), 4)
    with pytest.raises(ConfigError):
        parse_layers("a-b")


# ----------------------------------------------------------------------------- tuning


def test_adamw_matches_torch():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW(ref.values(), lr=5e-4)
    state: AdamWState = adamw_init(params)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        params, state = adamw_step(params, grads, state, lr=5e-4)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        for k in params:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=0, atol=1e-7)
    assert state.step == 3


def test_none_design_is_refused(tiny_clip):
    model = PromptedCLIP(tiny_clip, PromptConfig(design="none"), CLASSES, TEMPLATES)
    with pytest.raises(ConfigError, match="nothing|no prompt parameters"):
        Tapt(model, None, TaptConfig(weight=0))


def test_layers_deeper_than_encoder_are_refused(tiny_clip):
    model = _model(tiny_clip, "vpt")
    with pytest.raises(ConfigError, match="blocks"):
        Tapt(model, _random_stats(model), TaptConfig(layers=(0, 9)))


def test_prompts_reset_per_image(tiny_clip):
    model = _model(tiny_clip, "ivlp")
    stats, cfg = _random_stats(model), TaptConfig(views=8, tau=0.25)
    trained = model.prompt_state()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for tune in (lambda xs, idx: Tapt(model, stats, cfg)(xs, idx), lambda xs, idx: tune_sequential(model, xs, stats,
                                                                                                  cfg, idx)):
        both = tune(x, [0, 1])
        second = tune(x[1:], [1])
        torch.testing.assert_close(both.logits[1:], second.logits, rtol=0, atol=1e-5)
        for k, v in both.prompts.items():
            torch.testing.assert_close(v[1:], second.prompts[k], rtol=0, atol=1e-6)
            # one AdamW step from the TRAINED values: |delta| <= lr * (1 + wd * |p|)
            bound = cfg.lr * (1 + cfg.weight_decay * trained[k].abs()) + 1e-6
            assert ((v - trained[k]).abs() <= bound).all(), k
            assert not torch.equal(v[0], trained[k]), k  # and it did move
    for k, v in model.prompt_state().items():
        assert torch.equal(v, trained[k]), f"the model's own prompt {k} was modified"


@pytest.mark.parametrize("design", ["vpt", "ivlp", "maple", "coop", "fap"])
def test_batched_equals_sequential(tiny_clip, design):
    model = _model(tiny_clip, design)
    stats, cfg = _random_stats(model), TaptConfig(views=8, tau=0.25, steps=2)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    batched = Tapt(model, stats, cfg)(x, [4, 5, 6])
    seq = tune_sequential(model, x, stats, cfg, [4, 5, 6])
    assert torch.equal(batched.logits.argmax(1), seq.logits.argmax(1))
    torch.testing.assert_close(batched.logits, seq.logits, rtol=0, atol=1e-4)
    assert batched.prompts.keys() == seq.prompts.keys() and batched.prompts
    for k in batched.prompts:
        torch.testing.assert_close(batched.prompts[k], seq.prompts[k], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- attacks


def test_adaptive_attack_is_at_least_as_strong(trained_classifier):
    model, x, y = trained_classifier
    x, y = x[::2][:12], y[::2][:12]
    layers = (0, 1, 2, 3)
    transfer = build_attack("pgd", eps=4 / 255, steps=3, module=model, seed=0)
    stats = compute_stats(model, x, y, layers, attack=transfer, batch_size=12)
    cfg = TaptConfig(views=8, tau=0.25, lr=0.01)
    ev = TaptEvalConfig(eps=24, attack_steps=10, adaptive_steps=5, eot=1, batch_size=12)
    m = evaluate_tapt(model, x, y, stats, cfg, ev)
    assert m["clean_acc"] >= 0.5, "the fixture model must have real accuracy"
    assert m["robust_acc"] < m["clean_acc"], "eps large enough for the transfer attack to bite"
    assert m["adaptive_robust_acc"] <= m["tapt_robust_acc"]
    assert m["adaptive_robust_acc"] <= m["tapt_clean_acc"]
    # the adaptive attack alone (no worst-of with the transfer example) also breaks TAPT
    tapt = Tapt(model, stats, cfg)
    x_ada = adaptive_attack(tapt, x, y, x, eps=24 / 255, steps=4, step_size=6 / 255)
    assert (x_ada - x).abs().max() <= 24 / 255 + 1e-6 and x_ada.min() >= 0 and x_ada.max() <= 1
    acc_ada = (tapt(x_ada).logits.argmax(1) == y).float().mean().item()
    assert acc_ada < (tapt(x).logits.argmax(1) == y).float().mean().item()
    assert all(p.grad is None for p in model.parameters())


def test_adaptive_gradient_is_finite_through_the_update(tiny_clip):
    model = _model(tiny_clip, "maple", depth=2)
    tapt = Tapt(model, _random_stats(model), TaptConfig(views=4, tau=0.5, steps=2))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    params = tapt.tune(x, view_generators(0, [0, 1]), create_graph=True)
    loss = tapt.predict(params, x).logsumexp(1).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_eval_config_validation():
    with pytest.raises(ConfigError, match="--eps"):
        TaptEvalConfig(eps=300)
    with pytest.raises(ConfigError, match="tau"):
        TaptConfig(tau=0)


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.data.sources import shards_from_digits
    from pipeline.task import load_task
    from pipeline.train import train

    root = tmp_path_factory.mktemp("tapt_cli")
    shards_from_digits(root / "digits", progress=False, shard_size=2000)
    cfg = load_config(overrides=["method=advvlp", "prompt.depth=2", "optim.epochs=1", "optim.warmup_epochs=0",
                                 "data.shots=2", f"data.path={root / 'digits'}", "data.test_limit=8",
                                 "eval.attack=none", "optim.batch_size=10"])
    train(cfg, load_task(cfg.data, 32), out_dir=root / "run")
    return root


def _parse(argv: list[str]) -> argparse.Namespace:
    from pipeline.tapt_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_stats_then_tapt(run_folder):
    root = run_folder
    args = _parse(["tapt-stats", "--run", str(root / "run"), "--data", str(root / "digits"), "--out",
                   str(root / "stats" / "stats.pt"), "--limit", "8", "--attack-steps", "2", "--batch-size", "4"])
    assert args.func(args) == 0
    stats = load_stats(root / "stats" / "stats.pt")
    assert stats.layers == (0, 1, 2, 3) and stats.n_images == 8
    assert json.loads((root / "stats" / "summary.json").read_text())["command"] == "tapt-stats"
    args = _parse(["tapt", "--run", str(root / "run"), "--data", str(root / "digits"), "--out", str(root / "out"),
                   "--stats", str(root / "stats" / "stats.pt"), "--views", "4", "--limit", "6", "--eps", "4",
                   "--attack-steps", "2", "--adaptive-steps", "1", "--batch-size", "3", "--layers", "0-1"])
    assert args.func(args) == 0
    doc = json.loads((root / "out" / "summary.json").read_text())
    metrics = doc["metrics"]
    for key in ("clean_acc", "tapt_clean_acc", "robust_acc", "tapt_robust_acc", "adaptive_robust_acc"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["adaptive_robust_acc"] <= metrics["tapt_robust_acc"]
    assert doc["config"]["tapt"]["views"] == 4 and doc["config"]["tapt"]["layers"] == [0, 1]
    assert math.isclose(doc["config"]["tapt"]["weight"], 400 / 9)
    # without --stats: statistics from the run's own training shards (its data.path)
    args = _parse(["tapt", "--run", str(root / "run"), "--data", str(root / "digits"), "--out", str(root / "out2"),
                   "--views", "4", "--limit", "3", "--attack-steps", "1", "--no-adaptive", "--stats-limit", "4"])
    assert args.func(args) == 0
    metrics = json.loads((root / "out2" / "summary.json").read_text())["metrics"]
    assert metrics["adaptive_robust_acc"] is None and 0 <= metrics["tapt_robust_acc"] <= 1


def test_cli_bad_input_is_one_line(run_folder, tmp_path):
    root = run_folder
    args = _parse(["tapt", "--run", str(tmp_path / "nope"), "--data", str(root / "digits"), "--out", str(tmp_path)])
    with pytest.raises(ConfigError) as err:
        args.func(args)
    assert "--run" in str(err.value) and "\n" not in str(err.value)
    args = _parse(["tapt", "--run", str(root / "run"), "--data", str(tmp_path / "nodata"), "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="--data") as err:
        args.func(args)
    assert "\n" not in str(err.value)
    (tmp_path / "summary.json").write_text(json.dumps({"command": "train"}))
    args = _parse(["tapt-stats", "--run", str(root / "run"), "--data", str(root / "digits"),
                   "--out", str(tmp_path / "stats.pt")])
    with pytest.raises(ConfigError, match="another command"):
        args.func(args)
