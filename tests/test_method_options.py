"""The three method choices that differ from the official code: FAP layer-0 coupling, TAPT reset, TAPT stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.attacks import build_attack
from pipeline.config import ConfigError, PromptConfig, load_config
from pipeline.prompts import INITIAL, PromptedCLIP
from pipeline.tapt import Tapt, TaptConfig, reset_values, tune_sequential
from pipeline.tapt_stats import compute_stats

from .conftest import CLASSES, TEMPLATES

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tiny_clip, design: str = "ivlp", **kw) -> PromptedCLIP:
    torch.manual_seed(1)
    return PromptedCLIP(tiny_clip, PromptConfig(design=design, depth=3, **kw), CLASSES, TEMPLATES)


# ----------------------------------------------------------------------------- FAP layer 0


def test_fap_layer0_coupled_is_a_linear_map_of_the_text_context(tiny_clip):
    sep, cpl = _model(tiny_clip, "fap"), _model(tiny_clip, "fap", fap_layer0="coupled")
    names_sep = {k for k, _ in sep.prompts.named_parameters()}
    names_cpl = {k for k, _ in cpl.prompts.named_parameters()}
    assert "vision.2" in names_sep and "vision.2" not in names_cpl  # one vision parameter fewer
    assert {"proj0.weight", "proj0.bias"} <= names_cpl and not any(k.startswith("proj0") for k in names_sep)
    p = cpl.prompts
    vis, txt = p.vision_prompts(), p.text_prompts()
    assert len(vis) == len(txt) == 3
    torch.testing.assert_close(vis[0], p.proj0(p.text[0]))  # layer 0: vision = Linear_0(text context)
    torch.testing.assert_close(txt[1], p.proj[0](vis[1]))  # deeper: text = Linear_l(vision), as before
    with torch.no_grad():  # the coupling is live: moving the text context moves the layer-0 vision prompt
        p.text[0].add_(0.5)
    assert not torch.allclose(p.vision_prompts()[0], vis[0])
    loss = F.cross_entropy(cpl(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert p.proj0.weight.grad is not None and p.proj0.weight.grad.abs().sum() > 0


def test_fap_layer0_option_is_validated_and_checked_at_load(tiny_clip):
    assert load_config(overrides=["method=fap", "prompt.fap_layer0=coupled"]).prompt.fap_layer0 == "coupled"
    with pytest.raises(ConfigError, match="prompt.fap_layer0"):
        load_config(overrides=["method=fap", "prompt.fap_layer0=shared"])
    with pytest.raises(ConfigError, match="fap_layer0=coupled"):
        _model(tiny_clip, "fap", fap_layer0="coupled").load_prompt_state(_model(tiny_clip, "fap").prompt_state())


# ----------------------------------------------------------------------------- initial values and TAPT reset


def _trained(tiny_clip, design: str = "ivlp") -> PromptedCLIP:
    """A model whose prompts moved away from their initial values (as after training). The move is random
    per entry: a constant shift of a token is invisible behind the next LayerNorm, which would make the
    trained and the initial prompts the same function (and a test comparing their logits vacuous)."""
    model = _model(tiny_clip, design)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.prompts.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_initial_values_travel_with_the_checkpoint(tiny_clip):
    model = _trained(tiny_clip)
    state = model.prompt_state()
    assert any(k.startswith(INITIAL) for k in state)
    torch.testing.assert_close(state[f"{INITIAL}vision.1"], _model(tiny_clip).prompts.initial["vision.1"])
    assert not torch.equal(state[f"{INITIAL}vision.1"], state["vision.1"])
    fresh = _model(tiny_clip)
    torch.manual_seed(5)
    other = PromptedCLIP(tiny_clip, PromptConfig(design="ivlp", depth=3), CLASSES, TEMPLATES)  # other init
    other.load_prompt_state(state)
    for k, v in fresh.prompts.initial.items():
        assert torch.equal(other.prompts.initial[k], v), k  # the run's initial values, not other's own
    old = {k: v for k, v in state.items() if not k.startswith(INITIAL)}  # a checkpoint from before
    other.load_prompt_state(old)
    assert other.prompts.initial is None


def test_official_reset_starts_from_trained_context_and_initial_deep_prompts(tiny_clip):
    model = _trained(tiny_clip)
    trained = {k: p.detach() for k, p in model.prompts.named_parameters()}
    start = reset_values(model, "official")
    assert torch.equal(start["text.0"], trained["text.0"])  # layer-0 text context: trained value
    for k in start:
        if k != "text.0":  # every vision prompt and deep text prompt: its initial value
            assert torch.equal(start[k], model.prompts.initial[k]) and not torch.equal(start[k], trained[k]), k
    assert all(torch.equal(v, trained[k]) for k, v in reset_values(model, "trained").items())
    cfg = TaptConfig(views=4, tau=0.5, weight=0, reset="official")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    batched, seq = Tapt(model, None, cfg)(x, [0, 1]), tune_sequential(model, x, None, cfg, [0, 1])
    torch.testing.assert_close(batched.logits, seq.logits, rtol=1e-4, atol=1e-4)
    chunked = Tapt(model, None, cfg)
    chunked.select_chunk = cfg.views  # view selection one image per forward: the same views
    torch.testing.assert_close(chunked(x, [0, 1]).logits, batched.logits)
    for k, v in batched.prompts.items():  # one AdamW step from the official start, not from the trained one
        bound = cfg.lr * (1 + cfg.weight_decay * start[k].abs()) + 1e-6
        assert ((v - start[k]).abs() <= bound).all(), k
    trained_logits = Tapt(model, None, TaptConfig(views=4, tau=0.5, weight=0))(x, [0, 1]).logits
    assert (trained_logits - batched.logits).abs().max() > 1e-3  # far above float noise (~1e-6 here)


def test_official_reset_needs_initial_values_and_coupling_maps_stay_trained(tiny_clip):
    model = _trained(tiny_clip, "maple")
    start = reset_values(model, "official")
    assert all(torch.equal(start[k], p) for k, p in model.prompts.named_parameters() if k.startswith("proj"))
    model.prompts.initial = None
    with pytest.raises(ConfigError, match="reset=official needs"):
        Tapt(model, None, TaptConfig(weight=0, reset="official")).initial(1)
    with pytest.raises(ConfigError, match="reset"):
        TaptConfig(reset="random")


# ----------------------------------------------------------------------------- TAPT statistics


def test_adv_statistics_on_pgd_or_clean_images(tiny_clip):
    model = _trained(tiny_clip)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    attack = build_attack("pgd", eps=8 / 255, steps=2, module=model, seed=0)
    ours = compute_stats(model, x, y, (0, 1), attack=attack)
    official = compute_stats(model, x, y, (0, 1), attack=attack, adv_images="clean")
    for a, c in zip(official.adv_mean, official.clean_mean, strict=True):
        assert torch.equal(a, c)  # same prompts (no clean run), same clean images -> identical
    assert not torch.allclose(ours.adv_mean[0], ours.clean_mean[0])  # PGD images differ
    assert torch.equal(ours.clean_mean[0], official.clean_mean[0])
    with pytest.raises(ConfigError, match="adv images"):
        compute_stats(model, x, y, (0,), attack=attack, adv_images="fgsm")
