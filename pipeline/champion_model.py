"""The champion as an MLflow pyfunc model, logged as "models from code": this file is the model.

Loading it (``mlflow.pyfunc.load_model("models:/<name>@champion")``) runs this file, which rebuilds the
prompted CLIP from the model reference in the prompts' config (open_clip name + pretrained tag, or the
CLIP checkpoint shipped beside the prompts as an artifact) and loads the learned prompts with
``torch.load(weights_only=True)``: tensors and plain values only, no pickled code. No part of the model
is a pickle; ``pipeline/`` itself ships with the model (``code/``).

``predict(images)``: float32 images (N, 3, H, W) in [0, 1] at the model's input size (the signature
says which) -> class probabilities (N, C), columns in the order of the metadata's ``classnames``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

PROMPTS = "prompts"  # artifact key: the prompts file (prompt weights, config, class names, templates)
CHECKPOINT = "clip_checkpoint"  # artifact key: the CLIP weights file, when the model was a local checkpoint
_KEYS = {"prompts", "config", "classnames", "templates"}


def read_prompts(path: str | Path) -> dict[str, Any]:
    """A prompts file, checked: loaded with ``weights_only=True`` and holding exactly what a prompts file holds."""
    from pipeline.config import ConfigError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one that holds code
        raise ConfigError(f"champion prompts {path}: not a plain weights file ({str(exc).splitlines()[0][:200]})") \
            from None
    missing = _KEYS - set(state) if isinstance(state, dict) else _KEYS
    if missing or not all(isinstance(v, torch.Tensor) for v in state["prompts"].values()):
        raise ConfigError(f"champion prompts {path}: not a prompts file (missing {sorted(missing)} or non-tensor "
                          "prompt weights)")
    return state


def build(state: dict[str, Any], checkpoint: str | None = None, device: str = "cpu") -> Any:
    """The prompted CLIP of a prompts file (its CLIP from ``checkpoint`` when given), in eval mode."""
    from pipeline.config import ConfigError, from_dict
    from pipeline.train import build_model

    cfg = from_dict(state["config"])
    if checkpoint is not None:
        cfg = cfg.replace(**{"model.checkpoint": str(checkpoint)})
    elif cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        raise ConfigError(f"champion: CLIP checkpoint {cfg.model.checkpoint} was not shipped with the model")
    torch.manual_seed(cfg.run.seed)  # as training did: the same CLIP when it has no weights (random init)
    model = build_model(cfg, list(state["classnames"]), list(state["templates"]), torch.device(device))
    model.load_prompt_state(state["prompts"], source="champion prompts")
    return model.eval()


def probabilities(model: Any, images: Any, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, C) of float images (N, 3, H, W) in [0, 1]."""
    if isinstance(images, dict) and len(images) == 1:  # a named tensor input
        images = next(iter(images.values()))
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    size = model.image_size
    if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
        raise ValueError(f"champion: images must be float32 (N, 3, {size}, {size}) in [0, 1], got {tuple(x.shape)}")
    device = next(model.parameters()).device
    with torch.no_grad():
        text = model.text_features()
        out = [torch.softmax(model.logits(b.to(device), text), dim=-1).cpu() for b in x.split(batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


class CaptChampion(PythonModel):
    """pyfunc wrapper: ``load_context`` rebuilds the model, ``predict`` returns class probabilities."""

    def load_context(self, context: Any) -> None:
        state = read_prompts(context.artifacts[PROMPTS])
        self.classnames = list(state["classnames"])
        self.model = build(state, context.artifacts.get(CHECKPOINT))

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        return probabilities(self.model, model_input)


set_model(CaptChampion())
