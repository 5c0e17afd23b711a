"""TAPT's encoder side: augmented views, the per-image prompted forward, reference statistics.

Views: each test image becomes N views, view 0 the image itself, the others RandomResizedCrop
(torchvision's rule, default scale and ratio) + horizontal flip, cropped bilinearly from the
already resized image in pure torch (batched, seeded per image, differentiable in the image).

Batched forward: B images, each with its own prompt copy (parameters stacked along a leading
dim). Per-image prompts come from ``vmap(functional_call)`` over the PromptLearner's own
``text_prompts`` / ``vision_prompts`` (so every design's coupling applies); the encoders then run
on rows with per-row prompt tokens (:func:`_vision`, :func:`_text` mirror ``PromptedCLIP``'s loops,
which take one prompt set for the whole batch).

Reference statistics. TAPT aligns the test image's token statistics with statistics precomputed
on a public dataset (ImageNet in the paper) with two prompts:

* ``adv``: the adversarially trained run's prompts on ADVERSARIAL images of the public dataset
  (PGD against that same model);
* ``clean``: a clean-trained prompt on clean images. When no clean-trained run is given, this
  project falls back to the adversarial run's own prompts on clean images (documented choice: the
  same encoder, so the token shapes always match, and the statistics still describe clean inputs).

Which images the ``adv`` statistics see is a named choice (``adv_images``): ``pgd`` (default, ours,
the paper's description) or ``clean``: the official code computes BOTH statistics on clean
training images, once with the clean-trained and once with the adversarially trained prompts;
``clean`` reproduces it. See docs/METHODS.md.

For every layer ``l`` in ``layers`` the INPUT tokens of vision block ``l`` (B, T, D) are reduced over
images to a mean and a biased variance per token position and channel, shape (T, D). Sums run in
float64 batch by batch, so no tokens are held beyond one batch. Files are written with
``torch.save`` as a dict of plain tensors and read back with ``weights_only=True``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from .attacks import Attack
from .config import ConfigError
from .data.pixels import as_pixels
from .prompts import FixedTextClassifier, PromptedCLIP, no_autocast

PUBLISHED_LAYERS = tuple(range(8))  # official code: blocks 0..7 (ALIGN_LAYER_FROM=0, ALIGN_LAYER_TO - 1 = 8)


def resolve_layers(layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """Layers to align. ``None``: the published 0..7, clipped to the encoder's depth.

    Explicitly requested layers must exist: a layer index >= ``n_layers`` raises ConfigError.
    """
    if n_layers < 1:
        raise ConfigError("tapt: TAPT needs a ViT image encoder (its block inputs are aligned)")
    if layers is None:
        return tuple(i for i in PUBLISHED_LAYERS if i < n_layers)
    out = tuple(sorted({int(i) for i in layers}))
    if not out:
        raise ConfigError("--layers: no layer given")
    if out[0] < 0 or out[-1] >= n_layers:
        raise ConfigError(f"--layers: {list(out)} out of range; the image encoder has {n_layers} blocks "
                          f"(0..{n_layers - 1})")
    return out


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0-7"`` / ``"0,2,4"`` / ``"0-3,6"`` -> a tuple of layer indices."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ConfigError(f"--layers: {text!r} is not a list like 0-7 or 0,2,4") from None
    if not out:
        raise ConfigError(f"--layers: {text!r} names no layer")
    return tuple(out)


# ----------------------------------------------------------------------------- views


def view_generators(seed: int, indices: Sequence[int], stream: int = 0) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, image index, stream): batch-independent views."""
    return [torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(i)) * 1_000_033 + int(stream)) % 2**63)
            for i in indices]


def crop_boxes(gen: torch.Generator, n: int, h: int, w: int, scale: tuple[float, float],
               ratio: tuple[float, float]) -> torch.Tensor:
    """``n`` RandomResizedCrop boxes (torchvision's 10-attempt rule and centre fallback) and flips.

    Returns (n, 5) float: top, left, height, width, flip (0/1).
    """
    area, attempts = h * w, 10
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=gen)
    aspect = torch.exp(torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen))
    cw, ch = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.float().argmax(dim=1, keepdim=True)
    cw, ch, found = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], ok.any(dim=1)
    if w / h < ratio[0]:  # centre-crop fallback, as torchvision
        fw, fh = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        fw, fh = round(h * ratio[1]), h
    else:
        fw, fh = w, h
    cw, ch = torch.where(found, cw, float(fw)), torch.where(found, ch, float(fh))
    u = torch.rand(n, 3, generator=gen)
    top = torch.where(found, (u[:, 0] * (h - ch + 1)).floor(), float((h - fh) // 2))
    left = torch.where(found, (u[:, 1] * (w - cw + 1)).floor(), float((w - fw) // 2))
    return torch.stack([top, left, ch, cw, (u[:, 2] < 0.5).float()], dim=1)


def make_views(images: torch.Tensor, n_views: int, gens: Sequence[torch.Generator], *,
               scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, V, 3, H, W): view 0 is the image, the rest random resized crops
    (bilinear, back to H x W) with random horizontal flips. Differentiable in ``images``."""
    b, c, h, w = images.shape
    if n_views == 1:
        return images[:, None]
    boxes = torch.cat([crop_boxes(g, n_views - 1, h, w, scale, ratio) for g in gens])  # (B*(V-1), 5)
    top, left, ch, cw, flip = boxes.unbind(1)
    sx = (cw / w) * (1 - 2 * flip)  # a flip mirrors the crop: negative x scale
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, (2 * left + cw) / w - 1], 1),
                         torch.stack([zero, ch / h, (2 * top + ch) / h - 1], 1)], 1)  # (N, 2, 3)
    src = images.repeat_interleave(n_views - 1, dim=0)  # (B*(V-1), 3, H, W)
    grid = F.affine_grid(theta.to(images), list(src.shape), align_corners=False)
    crops = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.cat([images[:, None], crops.view(b, n_views - 1, c, h, w)], dim=1)


# ----------------------------------------------------------------------------- batched forward


class _PromptFn(nn.Module):
    def __init__(self, learner: nn.Module):
        super().__init__()
        self.learner = learner

    def forward(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        return tuple(self.learner.text_prompts()), tuple(self.learner.vision_prompts())


def sample_prompts(model: PromptedCLIP, params: dict[str, torch.Tensor]) -> tuple[list, list]:
    """Per-image per-layer prompts [(B, n, D)] (text, vision) from stacked parameters (B, ...)."""
    fn = _PromptFn(model.prompts)
    text, vision = vmap(lambda p: functional_call(fn, {f"learner.{k}": v for k, v in p.items()}, ()))(params)
    return list(text), list(vision)


def _vision(model: PromptedCLIP, images: torch.Tensor, prompts: Sequence[torch.Tensor],
            capture: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``PromptedCLIP._vision_forward`` with per-row prompts (N, n, D): features (N, E), block inputs."""
    v = model.clip.visual
    x = v.conv1((images - model.mean) / model.std)  # (N, D, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, g*g, D)
    cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = v.patch_dropout(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
    n = prompts[0].shape[1] if prompts else 0
    if prompts:
        x = torch.cat([x, prompts[0].to(x.dtype)], dim=1)
    x = v.ln_pre(x)
    captured = []
    batch_first = getattr(v.transformer, "batch_first", True)
    for i, blk in enumerate(v.transformer.resblocks):
        if 0 < i < len(prompts):
            x = torch.cat([x[:, :-n], prompts[i].to(x.dtype)], dim=1)
        if i in capture:
            captured.append(x)
        x = blk(x) if batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
    pooled, _ = v._pool(x[:, :-n] if n else x)
    if v.proj is not None:
        pooled = pooled @ v.proj
    return F.normalize(pooled.float(), dim=-1), captured


def _text(model: PromptedCLIP, deep: Sequence[torch.Tensor]) -> torch.Tensor:
    """``PromptedCLIP.text_features`` with per-image prompts [(B, n, D)]: (B, C, E)."""
    tt, n_ctx = model.text_tower, model.cfg.n_ctx_text
    b, c = deep[0].shape[0], model.tok_prefix.shape[0]

    def rows(p: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B*C, n, D), row = b * C + c
        return p.to(model.tok_prefix.dtype).repeat_interleave(c, dim=0)

    x = torch.cat([model.tok_prefix.repeat(b, 1, 1), rows(deep[0]), model.tok_suffix.repeat(b, 1, 1)], dim=1)
    length = x.shape[1]
    x = x + tt.positional_embedding[:length].to(x.dtype)
    mask = None if tt.attn_mask is None else tt.attn_mask[:length, :length]
    for i, blk in enumerate(tt.blocks):
        if 0 < i < len(deep):
            x = torch.cat([x[:, :1], rows(deep[i]).to(x.dtype), x[:, 1 + n_ctx:]], dim=1)
        x = blk(x, attn_mask=mask) if tt.batch_first else blk(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    x = tt.ln_final(x)
    pooled = x[torch.arange(b * c, device=x.device), model.tok_eot.repeat(b)]
    if isinstance(tt.projection, nn.Linear):
        pooled = tt.projection(pooled)
    elif tt.projection is not None:
        pooled = pooled @ tt.projection
    return F.normalize(pooled.float(), dim=-1).view(b, c, -1)


def scaled_logits(model: PromptedCLIP, img: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, K, E) image features x text (B, C, E) per image or (C, E) shared -> (B, K, C), in float32
    also under bf16 autocast (as :func:`pipeline.prompts.class_logits`: the view selection ranks
    entropies of these logits)."""
    with no_autocast(img.device):
        img, text = img.float(), text.float()
        sim = torch.einsum("bke,bce->bkc", img, text) if text.ndim == 3 else img @ text.t()
        out = model.clip.logit_scale.exp().float() * sim
        bias = getattr(model.clip, "logit_bias", None)
        return out + bias.float() if bias is not None else out


def batched_forward(model: PromptedCLIP, params: dict[str, torch.Tensor], views: torch.Tensor,
                    capture: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Views (B, K, 3, H, W) of B images, image b seen with prompts ``params[.][b]``:
    logits (B, K, C) and block inputs [(B, K, T, D)] of the ``capture`` layers."""
    b, k = views.shape[:2]
    text_p, vision_p = sample_prompts(model, params)
    text = _text(model, text_p) if model.spec.text else model.frozen_text
    feats, cap = _vision(model, views.flatten(0, 1), [p.repeat_interleave(k, dim=0) for p in vision_p], capture)
    logits = scaled_logits(model, feats.view(b, k, -1), text)
    return logits, [t.view(b, k, *t.shape[1:]) for t in cap]


def token_shape(model: PromptedCLIP) -> tuple[int, int]:
    """(T, D) of the vision blocks' input tokens: class + patches + vision prompts."""
    v = model.clip.visual
    grid = model.image_size // v.conv1.kernel_size[0]
    return 1 + grid * grid + (model.cfg.n_ctx_vision if model.spec.vision else 0), v.conv1.out_channels



# ----------------------------------------------------------------------------- statistics


@dataclass
class TaptStats:
    """Reference statistics: per aligned layer, (T, D) means and biased variances."""

    layers: tuple[int, ...]
    adv_mean: list[torch.Tensor]
    adv_var: list[torch.Tensor]
    clean_mean: list[torch.Tensor]
    clean_var: list[torch.Tensor]
    n_images: int = 0

    def select(self, layers: Sequence[int], device: torch.device | str = "cpu") -> TaptStats:
        """The statistics of ``layers`` (a subset of the stored ones), as float32 on ``device``."""
        missing = [i for i in layers if i not in self.layers]
        if missing:
            raise ConfigError(f"--stats: layers {missing} are not in the statistics file (it has {list(self.layers)})")
        pos = [self.layers.index(i) for i in layers]

        def pick(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [ts[p].to(device=device, dtype=torch.float32) for p in pos]

        return TaptStats(tuple(layers), pick(self.adv_mean), pick(self.adv_var), pick(self.clean_mean),
                         pick(self.clean_var), self.n_images)

    def check_shape(self, tokens: int, width: int) -> None:
        shape = tuple(self.adv_mean[0].shape)
        if shape != (tokens, width):
            raise ConfigError(f"--stats: statistics are for tokens x width {shape}, but this model's vision "
                              f"blocks see {(tokens, width)} (another prompt design or backbone?)")


class RunningMoments:
    """Mean and biased variance over a stream of (B, T, D) batches, in float64."""

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, None, None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        s1, s2 = x.sum(dim=0), (x * x).sum(dim=0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.n:
            raise ConfigError("tapt-stats: no images to compute statistics on")
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(0)
        return mean.float().cpu(), var.float().cpu()


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(y), batch_size):
        yield as_pixels(x[i:i + batch_size]), y[i:i + batch_size]


def layer_moments(model: PromptedCLIP, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  layers: Sequence[int], *, attack: Attack | None = None,
                  device: torch.device | str = "cpu",
                  progress: bool = False, desc: str = "") -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Per-layer (T, D) mean and biased variance of the block inputs, with ``model``'s prompts.

    ``attack``: when given, statistics are taken on adversarial images crafted against ``model``.
    """
    model.eval()
    with torch.no_grad():
        classifier = FixedTextClassifier(model, model.text_features())
    moments = [RunningMoments() for _ in layers]
    for xb, yb in tqdm(batches, desc=desc, disable=not progress, leave=False):
        xb, yb = xb.to(device), yb.to(device)
        if attack is not None:
            xb = attack(classifier, xb, yb)
        with torch.no_grad():
            _, captured = model.image_features(xb, capture=list(layers))
        for m, tokens in zip(moments, captured, strict=True):
            m.update(tokens)
    pairs = [m.result() for m in moments]
    return [p[0] for p in pairs], [p[1] for p in pairs], moments[0].n


ADV_IMAGES = ("pgd", "clean")  # images of the adv statistics: ours (PGD) | the official code's (clean)


def compute_stats(adv_model: PromptedCLIP, x: torch.Tensor, y: torch.Tensor, layers: Sequence[int], *,
                  attack: Attack | None, clean_model: PromptedCLIP | None = None, batch_size: int = 32,
                  device: torch.device | str = "cpu", progress: bool = False, adv_images: str = "pgd") -> TaptStats:
    """``adv`` statistics (``adv_model`` on ``attack``-ed images, or on the clean images when
    ``adv_images="clean"``) and ``clean`` statistics (``clean_model`` on clean images; ``adv_model``
    itself when no clean model is given)."""
    if adv_images not in ADV_IMAGES:
        raise ConfigError(f"tapt-stats: adv images must be one of {list(ADV_IMAGES)}, got {adv_images!r}")
    if adv_images == "pgd" and attack is None:
        raise ConfigError("tapt-stats: adv statistics on PGD images need an attack")
    layers = tuple(layers)
    adv_m, adv_v, n = layer_moments(adv_model, _batches(x, y, batch_size), layers,
                                    attack=attack if adv_images == "pgd" else None, device=device,
                                    progress=progress, desc="adv stats")
    clean = clean_model if clean_model is not None else adv_model
    cl_m, cl_v, _ = layer_moments(clean, _batches(x, y, batch_size), layers, device=device, progress=progress,
                                  desc="clean stats")
    if cl_m[0].shape != adv_m[0].shape:
        raise ConfigError(f"--clean-run: its vision tokens {tuple(cl_m[0].shape)} differ from the adversarial "
                          f"run's {tuple(adv_m[0].shape)}; use runs with the same backbone and vision prompts")
    return TaptStats(layers, adv_m, adv_v, cl_m, cl_v, n)


def save_stats(path: str | Path, stats: TaptStats) -> Path:
    """Write a plain-tensor dict (readable with ``weights_only=True``), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"layers": torch.tensor(stats.layers, dtype=torch.long), "n_images": torch.tensor(stats.n_images),
           "adv_mean": torch.stack(stats.adv_mean), "adv_var": torch.stack(stats.adv_var),
           "clean_mean": torch.stack(stats.clean_mean), "clean_var": torch.stack(stats.clean_var)}
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")  # one per writer: concurrent trials may write the same file
    torch.save(doc, tmp)
    tmp.replace(p)
    return p


def load_stats(path: str | Path) -> TaptStats:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--stats: file not found: {p} (make one with `capt tapt-stats`)")
    try:
        doc = torch.load(p, map_location="cpu", weights_only=True)
        layers = tuple(int(i) for i in doc["layers"])
        parts = [list(doc[k].unbind(0)) for k in ("adv_mean", "adv_var", "clean_mean", "clean_var")]
    except Exception as exc:  # not a torch file, or not one of ours
        raise ConfigError(f"--stats: {p} is not a TAPT statistics file ({type(exc).__name__})") from None
    if any(len(part) != len(layers) for part in parts):
        raise ConfigError(f"--stats: {p} is inconsistent (layer count differs between tensors)")
    return TaptStats(layers, *parts, n_images=int(doc.get("n_images", torch.tensor(0))))
