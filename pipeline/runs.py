"""Run folders: what ``capt train`` writes and what ``capt eval`` / ``capt tapt`` read back.

A run folder holds ``prompts.pt`` (prompt weights, resolved config, class names, templates; loaded
with ``weights_only=True``), ``checkpoints/last.pt`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, from_dict
from .prompts import PromptedCLIP


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[Config, PromptedCLIP]:
    """The trained model of a run folder (its CLIP loaded as the run's config says)."""
    from .train import build_model, load_prompts

    path = Path(run_dir) / "prompts.pt"
    if not path.is_file():
        raise ConfigError(f"--run: {run_dir} is not a run folder (no prompts.pt; make one with `capt train`)")
    state = load_prompts(path)
    cfg = from_dict(state["config"])
    torch.manual_seed(cfg.run.seed)  # as train() did: the same CLIP when its weights are randomly initialised
    model = build_model(cfg, list(state["classnames"]), list(state["templates"]), torch.device(device))
    model.load_prompt_state(state["prompts"], source=str(path))
    model.eval()
    return cfg, model


def write_summary(out_dir: str | Path, *, command: str, config: dict[str, Any], metrics: dict[str, Any],
                  **extra: Any) -> Path:
    """Write ``OUT/summary.json`` atomically: resolved config + final metrics (stable names)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, "config": _redact(config), "metrics": _clean(metrics), **_clean(extra)}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".summary-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, out / "summary.json")
    return out / "summary.json"


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, tensors become numbers, paths become strings."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.item() if obj.numel() == 1 else obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


_SECRET_WORDS = ("password", "secret", "token")


def _redact(obj: Any) -> Any:
    """Hide credentials embedded in URLs (``scheme://user:pass@host``) and secret-named keys."""
    if isinstance(obj, dict):
        return {k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_redact(v) for v in obj]
    if isinstance(obj, str) and "://" in obj and "@" in obj:
        scheme, rest = obj.split("://", 1)
        creds, host = rest.split("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return obj


redact = _redact
