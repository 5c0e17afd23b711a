"""The prompted model: zero-shot equivalence, trimming, designs, depth checks, checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.clip import load_clip
from pipeline.config import ConfigError, ModelConfig, PromptConfig
from pipeline.prompts import DESIGNS, PromptedCLIP

from .conftest import CLASSES, TEMPLATES


def _open_clip_zero_shot(loaded, x):
    model, tok = loaded.model, loaded.tokenizer
    with torch.no_grad():
        t = F.normalize(model.encode_text(tok([t.format(c) for c in CLASSES for t in TEMPLATES])), dim=-1)
        t = F.normalize(t.view(len(CLASSES), len(TEMPLATES), -1).mean(1), dim=-1)
        xi = (x - torch.tensor(loaded.mean).view(1, 3, 1, 1)) / torch.tensor(loaded.std).view(1, 3, 1, 1)
        return model.logit_scale.exp() * F.normalize(model.encode_image(xi), dim=-1) @ t.t()


def test_no_prompts_reproduces_open_clip_zero_shot(tiny_clip):
    x = torch.rand(5, 3, 32, 32)
    ref = _open_clip_zero_shot(tiny_clip, x)
    full = PromptedCLIP(tiny_clip, PromptConfig(design="none"), CLASSES, TEMPLATES, trim_context=False)
    with torch.no_grad():
        assert torch.equal(full(x), ref)  # bit for bit at the full 77-token context
        trimmed = PromptedCLIP(tiny_clip, PromptConfig(design="none"), CLASSES, TEMPLATES, trim_context=True)
        torch.testing.assert_close(trimmed(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("design", ["coop", "ivlp", "maple", "fap"])
def test_trimmed_context_gives_same_text_features(tiny_clip, design):
    cfg = PromptConfig(design=design, depth=3)
    torch.manual_seed(1)
    a = PromptedCLIP(tiny_clip, cfg, CLASSES, TEMPLATES, trim_context=True)
    b = PromptedCLIP(tiny_clip, cfg, CLASSES, TEMPLATES, trim_context=False)
    b.prompts.load_state_dict(a.prompts.state_dict())
    assert a.tok_suffix.shape[1] < b.tok_suffix.shape[1]  # really shorter
    with torch.no_grad():
        torch.testing.assert_close(a.text_features(), b.text_features(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("design", sorted(set(DESIGNS) - {"none"}))
def test_only_prompt_parameters_get_gradients(tiny_clip, design):
    model = PromptedCLIP(tiny_clip, PromptConfig(design=design, depth=3), CLASSES, TEMPLATES)
    loss = F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    params = dict(model.prompts.named_parameters())
    assert params, "a learned design has parameters"
    missing = [k for k, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"prompt parameters without gradient: {missing}"
    leaked = [k for k, p in model.clip.named_parameters() if p.requires_grad or p.grad is not None]
    assert not leaked, f"CLIP weights reached by gradients: {leaked[:3]}"


def test_depth_beyond_the_model_is_a_clear_error(tiny_clip):
    with pytest.raises(ConfigError, match="prompt.depth=9 is deeper than the text encoder"):
        PromptedCLIP(tiny_clip, PromptConfig(design="ivlp", depth=9), CLASSES, TEMPLATES)
    with pytest.raises(ConfigError, match="image encoder"):
        PromptedCLIP(tiny_clip, PromptConfig(design="vpt", depth=5), CLASSES, TEMPLATES)


def test_coupled_design_needs_equal_lengths(tiny_clip):
    with pytest.raises(ConfigError, match="n_ctx_text"):
        PromptedCLIP(tiny_clip, PromptConfig(design="maple", depth=2, n_ctx_text=2, n_ctx_vision=4),
                     CLASSES, TEMPLATES)


def test_context_initialised_from_words(tiny_clip):
    model = PromptedCLIP(tiny_clip, PromptConfig(design="coop", depth=1, n_ctx_text=4, init="a photo of a"),
                         CLASSES, TEMPLATES)
    tokens = tiny_clip.tokenizer(["a photo of a"])
    words = tiny_clip.model.token_embedding(tokens)[0, 1:5]
    torch.testing.assert_close(model.prompts.text[0].detach(), words)


def test_missing_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="model.checkpoint: file not found"):
        load_clip(ModelConfig(name="capt-tiny", checkpoint=str(tmp_path / "nope.pt")))
    small = load_clip(ModelConfig(name="capt-small")).model
    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(ConfigError, match="does not match architecture capt-tiny"):
        load_clip(ModelConfig(name="capt-tiny", checkpoint=str(path)))
    loaded = load_clip(ModelConfig(name="capt-small", checkpoint=str(path)))
    assert torch.equal(loaded.model.logit_scale, small.logit_scale)


def test_pretrained_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load_clip(ModelConfig(name="ViT-B-32", pretrained="openai"))
    assert "model.checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        load_clip(ModelConfig(name="ViT-Z-99"))
