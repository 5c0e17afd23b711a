"""Clean and robust accuracy, the final strong-attack evaluation, base-to-new and cross-dataset.

Metric names are stable (they are the contract of ``summary.json`` and MLflow): ``clean_acc``,
``robust_acc`` (the per-epoch monitor attack), ``pgd100_acc``, ``cw100_acc``, ``autoattack_acc``
(at the training eps; ``..._eps<E>`` for other eps), ``base_*``, ``new_*``, ``hm_*`` and
``xd_<dataset>_*``. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .attacks import Attack, build_attack
from .data.pixels import as_pixels
from .prompts import FixedTextClassifier, PromptedCLIP

# name -> (attack, steps)
FINAL_ATTACKS = {"pgd10": ("pgd", 10), "pgd20": ("pgd", 20), "pgd100": ("pgd", 100), "cw100": ("cw", 100),
                 "autoattack": ("autoattack", 0)}


def correct(model: PromptedCLIP, x: torch.Tensor, y: torch.Tensor, *, attack: Attack | None = None,
            batch_size: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per sample (bool, on the CPU): is ``model`` right on (x, y), on adversarial images when
    ``attack`` is given."""
    model.eval()
    with torch.no_grad():
        text = model.text_features()  # once for the whole evaluation
    classifier = FixedTextClassifier(model, text)
    hits = []
    for i in range(0, len(y), batch_size):
        xb, yb = as_pixels(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device)
        if attack is not None:
            xb = attack(classifier, xb, yb)
        with torch.no_grad():
            hits.append((classifier(xb).argmax(dim=1) == yb).cpu())
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def accuracy(model: PromptedCLIP, x: torch.Tensor, y: torch.Tensor, *, attack: Attack | None = None,
             batch_size: int = 64, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on (x, y), on adversarial images when ``attack`` is given."""
    if len(y) == 0:
        return float("nan")
    return correct(model, x, y, attack=attack, batch_size=batch_size, device=device).float().mean().item()


def final_metrics(model: PromptedCLIP, x: torch.Tensor, y: torch.Tensor, *, attacks: Sequence[str],
                  eps_list: Sequence[float], primary_eps: float, batch_size: int = 64,
                  device: torch.device | str = "cpu", prefix: str = "",
                  autoattack_limit: int | None = None) -> dict[str, float]:
    """Clean accuracy and accuracy under each named attack at each eps (eps in 1/255 units).

    ``autoattack_limit``: AutoAttack (by far the costliest: its Square stage alone spends 5,000
    queries on every image still standing) runs on the first n images only; ``autoattack_acc`` is
    then over those n, and ``clean-aasub_acc`` / ``<attack>-aasub_acc`` give the other figures on
    the same n images, so that AutoAttack is compared with PGD on identical images.
    """
    def key(name: str, eps: float | None) -> str:
        return f"{prefix}{name}_acc" + ("" if eps is None or eps == primary_eps else f"_eps{eps:g}")

    masks = {key("clean", None): correct(model, x, y, batch_size=batch_size, device=device)}
    n_aa = len(y) if autoattack_limit is None else min(int(autoattack_limit), len(y))
    for name in attacks:
        kind, steps = FINAL_ATTACKS[name]
        n = n_aa if name == "autoattack" else len(y)
        for eps in eps_list:
            attack = build_attack(kind, eps=eps / 255.0, steps=steps, n_classes=len(model.classnames), module=model)
            masks[key(name, eps)] = correct(model, x[:n], y[:n], attack=attack, batch_size=batch_size, device=device)
    out = {k: m.float().mean().item() for k, m in masks.items()}
    if "autoattack" in attacks and n_aa < len(y):
        out[f"{prefix}autoattack_n"] = float(n_aa)
        for name in ["clean", *[a for a in attacks if a != "autoattack"]]:
            for eps in [None] if name == "clean" else eps_list:
                out[key(f"{name}-aasub", eps)] = masks[key(name, eps)][:n_aa].float().mean().item()
    return out


@contextlib.contextmanager
def label_space(model: PromptedCLIP, classnames: Sequence[str], templates: Sequence[str]) -> Iterator[None]:
    """Temporarily evaluate ``model`` on another list of classes (new classes, another dataset)."""
    old_names, old_templates = model.classnames, model.templates
    model.set_classes(classnames, templates)
    try:
        yield
    finally:
        model.set_classes(old_names, old_templates)


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def base_to_new(model: PromptedCLIP, base: dict[str, Any], new: dict[str, Any], **kw: Any) -> dict[str, float]:
    """Accuracy on base and new classes (``base``/``new``: dicts with classnames, templates, x, y)."""
    out: dict[str, float] = {}
    for prefix, part in (("base_", base), ("new_", new)):
        with label_space(model, part["classnames"], part["templates"]):
            out.update(final_metrics(model, part["x"], part["y"], prefix=prefix, **kw))
    for key in [k.removeprefix("base_") for k in out if k.startswith("base_")]:
        if f"new_{key}" in out:
            out[f"hm_{key}"] = harmonic_mean(out[f"base_{key}"], out[f"new_{key}"])
    return out
