"""Training augmentation (``data.augment``), applied to each training batch on both data paths.

``rrcrop_flip`` is what CoOp, MaPLe, APT and FAP train with (Dassl's ``random_resized_crop`` +
``random_flip``: scale (0.08, 1), ratio (3/4, 4/3), bicubic, flip with p = 0.5); ``flip`` only
flips; ``none`` leaves the batch as is. The crop is taken from the decoded image at the model's
input size (the centre crop the evaluation sees), not from the original file, so the in-memory and
streaming paths augment identically. Draws come from a generator seeded by (seed, epoch) and
consumed batch by batch, so a resumed run repeats them exactly. Training crafts its attack on the
augmented batch, as the peers' code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("none", "flip", "rrcrop_flip")
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7 + 1)


def crop_params(height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``g``: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * torch.rand(1, generator=g).item())
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=g).item())
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the centre crop
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(x: torch.Tensor, mode: str, g: torch.Generator) -> torch.Tensor:
    """Augment a batch of float pixels (B, 3, H, W) in [0, 1]; returns a new tensor (or ``x`` for none)."""
    if mode == "none":
        return x
    if mode not in MODES:
        raise ValueError(f"data.augment: {mode!r} is not one of {list(MODES)}")
    out = x.clone() if mode == "flip" else torch.empty_like(x)
    height, width = x.shape[-2:]
    for i in range(len(x)):
        if mode == "rrcrop_flip":
            top, left, h, w = crop_params(height, width, g)
            crop = x[i:i + 1, :, top:top + h, left:left + w]
            out[i] = F.interpolate(crop, size=(height, width), mode="bicubic", align_corners=False,
                                   antialias=True)[0].clamp_(0.0, 1.0)
        if torch.rand(1, generator=g).item() < 0.5:
            out[i] = out[i].flip(-1)
    return out
