"""The final evaluation protocol of a trained run: strong attacks, base-to-new, cross-dataset.

``final_evaluation`` is what ``capt train`` (and the search's re-evaluation of its best trials)
reports: clean accuracy and accuracy under each of ``eval.final_attacks`` at each of
``eval.final_eps`` on the run's own test split; when the run trained on the base half of the
classes, the same on the new half plus harmonic means; and zero-shot transfer to every
``data.cross_datasets`` folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .config import Config, eval_eps
from .evaluate import final_metrics, harmonic_mean, label_space
from .prompts import PromptedCLIP
from .task import TaskData, load_task

log = logging.getLogger(__name__)


def eval_settings(cfg: Config, device: torch.device | str) -> dict[str, Any]:
    eps_list = list(cfg.eval.final_eps) or [eval_eps(cfg)]
    primary = eval_eps(cfg) if eval_eps(cfg) in eps_list else eps_list[0]
    return {"attacks": list(cfg.eval.final_attacks), "eps_list": eps_list, "primary_eps": primary,
            "batch_size": cfg.eval.batch_size, "device": device, "autoattack_limit": cfg.eval.autoattack_limit}


def final_evaluation(cfg: Config, model: PromptedCLIP, task: TaskData, device: torch.device | str,
                     *, image_size: int | None = None) -> dict[str, float]:
    """Final metrics with stable names (see ``pipeline/evaluate.py``)."""
    kw = eval_settings(cfg, device)
    metrics = final_metrics(model, task.test_x, task.test_y, **kw)
    _set_robust(metrics, kw)
    size = image_size or model.image_size
    if cfg.data.classes == "base":
        new = load_task(cfg.data, size, classes="new")
        metrics.update({f"base_{k}": v for k, v in list(metrics.items())})
        with label_space(model, new.classnames, new.templates):
            new_m = final_metrics(model, new.test_x, new.test_y, prefix="new_", **kw)
        metrics.update(new_m)
        for k in [k for k in list(metrics) if k.startswith("new_")]:
            base_key = "base_" + k.removeprefix("new_")
            if base_key in metrics and "_acc" in k:
                metrics["hm_" + k.removeprefix("new_")] = harmonic_mean(metrics[base_key], metrics[k])
    for path in cfg.data.cross_datasets:
        metrics.update(cross_dataset(cfg, model, path, size, **kw))
    return metrics


def cross_dataset(cfg: Config, model: PromptedCLIP, path: str, size: int, **kw: Any) -> dict[str, float]:
    """Zero-shot transfer of the trained prompts to another dataset's classes (its test split)."""
    other = load_task(cfg.data.__class__(path=path, shots=1, seed=cfg.data.seed,
                                         test_limit=cfg.data.test_limit, strict=cfg.data.strict), size)
    name = _safe(other.name or Path(path).name)
    with label_space(model, other.classnames, other.templates):
        return final_metrics(model, other.test_x, other.test_y, prefix=f"xd_{name}_", **kw)


def _set_robust(metrics: dict[str, float], kw: dict[str, Any]) -> None:
    """``robust_acc`` = the first final attack at the primary eps (the headline robust figure)."""
    if kw["attacks"]:
        metrics["robust_acc"] = metrics[f"{kw['attacks'][0]}_acc"]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
