"""Shared fixtures: a tiny open_clip model (random weights, made here), toy tasks, a trained classifier."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.clip import load_clip  # noqa: E402
from pipeline.config import ModelConfig, PromptConfig  # noqa: E402
from pipeline.prompts import PromptedCLIP  # noqa: E402
from pipeline.task import TaskData  # noqa: E402

CLASSES = ["zero", "one", "two", "three"]
TEMPLATES = ["a photo of a {}.", "the number {}."]


def toy_images(n_per_class: int, seed: int, n_classes: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a fixed mean colour plus noise: learnable, and made here."""
    colours = torch.rand(n_classes, 3, 1, 1, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = (colours[y] + 0.1 * torch.randn(len(y), 3, size, size, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread avoids oversubscription stalls."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_clip():
    torch.manual_seed(0)
    return load_clip(ModelConfig(name="capt-tiny"))


@pytest.fixture
def toy_task() -> TaskData:
    x, y = toy_images(8, seed=0)
    xt, yt = toy_images(4, seed=1)
    return TaskData("toy", list(CLASSES), list(TEMPLATES), x, y, xt, yt)


@pytest.fixture(scope="session")
def trained_classifier():
    """A tiny CLIP whose image tower was fine-tuned on toy data (a model with real accuracy to attack)."""
    torch.manual_seed(0)
    loaded = load_clip(ModelConfig(name="capt-tiny"))
    model = PromptedCLIP(loaded, PromptConfig(design="ivlp", depth=2), CLASSES, TEMPLATES)
    visual = loaded.model.visual
    for p in visual.parameters():
        p.requires_grad_(True)
    x, y = toy_images(32, seed=0)
    opt = torch.optim.Adam(visual.parameters(), lr=3e-3)
    for _ in range(60):
        idx = torch.randint(0, len(y), (32,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in visual.parameters():
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.eval()
    xt, yt = toy_images(8, seed=1)
    return model, xt, yt
