"""Loading open_clip CLIP models: a pretrained tag, a local checkpoint, or a tiny registered config.

The project ships small architectures (``capt-tiny``, ``capt-small``) in ``pipeline/model_configs``
for tests and the offline demo; they are registered with open_clip so every model, tiny or
``ViT-B-16``, goes through the same ``open_clip.create_model`` path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from .config import ConfigError, ModelConfig

log = logging.getLogger(__name__)
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make the project's tiny architectures known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


@dataclass
class LoadedClip:
    model: nn.Module  # open_clip CLIP / CustomTextCLIP, frozen, eval mode
    tokenizer: object  # open_clip tokenizer: list[str] -> LongTensor (N, context_length)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int


def load_clip(cfg: ModelConfig, device: torch.device | str = "cpu") -> LoadedClip:
    """Build the open_clip model named by ``cfg`` with its weights; all CLIP weights frozen."""
    register_model_configs()
    if cfg.name not in open_clip.list_models() and not cfg.name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"model.name: unknown open_clip architecture {cfg.name!r}")
    if cfg.checkpoint is not None:
        model = _from_checkpoint(cfg)
    elif cfg.pretrained:
        model = _from_pretrained(cfg)
    else:
        log.warning("model %s has no weights (model.pretrained / model.checkpoint unset): random init", cfg.name)
        model = bare_model(cfg.name)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else int(size)
    tokenizer = open_clip.get_tokenizer(cfg.name)
    return LoadedClip(model=model, tokenizer=tokenizer, mean=mean, std=std, image_size=size)


class _DropNoWeightsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def bare_model(name: str) -> nn.Module:
    """``open_clip.create_model(name)`` without weights, minus open_clip's "initialized randomly"
    warning: the caller either loads a checkpoint next or has already said that there are no weights."""
    quiet = _DropNoWeightsWarning()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(name, pretrained=None)
    finally:
        root.removeFilter(quiet)


def _from_checkpoint(cfg: ModelConfig) -> nn.Module:
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise ConfigError(f"model.checkpoint: file not found: {path}")
    model = bare_model(cfg.name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a torch file
        raise ConfigError(f"model.checkpoint: cannot read {path}: {_first_line(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.checkpoint: {path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(_convert(model, state), strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"model.checkpoint: {path} does not match architecture {cfg.name}: {_first_line(exc)}"
        ) from None
    return model


def _convert(model: nn.Module, state: dict) -> dict:
    """Accept OpenAI-format and open_clip-format state dicts alike."""
    from open_clip.factory import convert_state_dict

    state = convert_state_dict(model, state)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    return state


def _from_pretrained(cfg: ModelConfig) -> nn.Module:
    try:
        return open_clip.create_model(cfg.name, pretrained=cfg.pretrained)
    except Exception as exc:
        raise ConfigError(
            f"model.pretrained: could not load {cfg.name}/{cfg.pretrained} ({_first_line(exc)[:160]}); "
            "offline, download the weights elsewhere and set model.checkpoint=/path/to/weights "
            "(or mount a filled cache at $HF_HOME)"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def image_size_of(model_name: str) -> int:
    """The input resolution of an open_clip architecture, without building it."""
    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(f"model.name: unknown open_clip architecture {model_name!r}")
    size = cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, list | tuple) else size)
