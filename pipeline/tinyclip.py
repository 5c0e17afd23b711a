"""Train a small CLIP from scratch on shards (``capt tiny-clip``), for offline demos and tests.

No pretrained weights can be downloaded offline, so the demo needs a CLIP whose zero-shot
classification works. This trains an open_clip architecture (``capt-small`` by default) with a
contrastive image-text loss, the texts being captions made from the shards' templates and class
names. Because many images share a caption, the loss is CLIP's symmetric InfoNCE with every
same-class pair counted as a positive (image -> the batch's captions, caption -> the batch's images).
The result is a plain open_clip state dict, loaded through the same ``model.checkpoint`` path as
any local checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from .clip import bare_model, register_model_configs
from .config import ConfigError
from .data.pixels import as_pixels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyClipConfig:
    model: str = "capt-small"
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0
    augment: bool = True


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 3 px (reflect-padded crops): cheap, keeps digits recognisable."""
    pad = 3
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    out = torch.empty_like(x)
    size = x.shape[-1]
    offs = torch.randint(0, 2 * pad + 1, (len(x), 2), generator=g)
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = padded[i, :, dy:dy + size, dx:dx + size]
    return out


def _caption_tokens(tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    texts = [t.format(c) for c in classnames for t in templates]
    return tokenizer(texts).view(len(classnames), len(templates), -1)  # (C, T, L)


def _class_captions(tokenizer, classnames: list[str],
                    templates: list[str] | list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, T_max, L) caption tokens and (C,) template counts; per-class template lists are padded by
    repetition (only the first ``count[c]`` of class c are ever sampled)."""
    per_class = [list(templates)] * len(classnames) if templates and isinstance(templates[0], str) else templates
    t_max = max(len(t) for t in per_class)
    texts = [t[i % len(t)].format(c) for c, t in zip(classnames, per_class, strict=True) for i in range(t_max)]
    counts = torch.tensor([len(t) for t in per_class])
    return tokenizer(texts).view(len(classnames), t_max, -1), counts


def train_tiny_clip(train_x: torch.Tensor, train_y: torch.Tensor, classnames: list[str],
                    templates: list[str] | list[list[str]], cfg: TinyClipConfig = TinyClipConfig(), *,
                    progress: bool = True, weights: torch.Tensor | None = None) -> torch.nn.Module:
    """Contrastive training from scratch; returns the open_clip model (eval mode).

    ``train_x``: uint8 or [0, 1] float images; ``templates``: one list for every class, or one list
    per class (several data sets trained together); ``weights``: per-image sampling weights (e.g.
    each data set drawn equally often), uniform when None.
    """
    register_model_configs()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = bare_model(cfg.model)  # trained from scratch below
    tokenizer = open_clip.get_tokenizer(cfg.model)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tokens, counts = _class_captions(tokenizer, classnames, templates)
    eot = int(tokens.argmax(dim=-1).max()) + 1
    same_count = bool((counts == counts[0]).all())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    from tqdm import tqdm

    t0 = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="tiny-clip", disable=not progress, mininterval=2):
        if weights is None:
            idx = torch.randint(0, len(train_y), (cfg.batch_size,), generator=g)
        else:
            idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=g)
        x, y = as_pixels(train_x[idx]), train_y[idx]
        if cfg.augment:
            x = _augment(x, g)
        if same_count:  # one template list for all classes: the original draw (same model as before)
            tmpl = torch.randint(0, int(counts[0]), (cfg.batch_size,), generator=g)
        else:  # one of the class's own templates
            tmpl = (torch.rand(cfg.batch_size, generator=g) * counts[y]).long()
        text = tokens[y, tmpl]  # (B, L): one caption per image
        loss = _contrastive_step(model, (x - mean) / std, text, y, eot)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 250 == 0:
            log.info("tiny-clip step %d/%d loss %.3f (%.0fs)", step, cfg.steps, loss.item(), time.perf_counter() - t0)
    return model.eval()


def _contrastive_step(model, x: torch.Tensor, text: torch.Tensor, y: torch.Tensor, eot: int) -> torch.Tensor:
    """Symmetric InfoNCE with same-class pairs as positives (soft targets)."""
    img = F.normalize(model.encode_image(x), dim=-1)
    txt = F.normalize(_encode_text_trimmed(model, text, eot), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.t()  # (B, B)
    pos = (y[:, None] == y[None, :]).float()
    targets = pos / pos.sum(dim=1, keepdim=True)
    loss_i = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def _encode_text_trimmed(model, text: torch.Tensor, length: int) -> torch.Tensor:
    """open_clip's CLIP.encode_text on a context trimmed to ``length`` (same features, causal mask)."""
    text = text[:, :length]
    x = model.token_embedding(text) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
    return x @ model.text_projection


@torch.no_grad()
def zero_shot_accuracy(model, x: torch.Tensor, y: torch.Tensor, classnames: list[str], templates: list[str],
                       model_name: str) -> float:
    """Plain open_clip zero-shot accuracy (template ensemble) on [0, 1] images."""
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = _caption_tokens(tokenizer, classnames, templates).flatten(0, 1)
    feats = F.normalize(model.encode_text(tokens), dim=-1).view(len(classnames), len(templates), -1)
    feats = F.normalize(feats.mean(dim=1), dim=-1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    correct = 0
    for i in range(0, len(y), 256):
        img = F.normalize(model.encode_image((as_pixels(x[i:i + 256]) - mean) / std), dim=-1)
        correct += ((img @ feats.t()).argmax(dim=1) == y[i:i + 256]).sum().item()
    return correct / len(y)


def tiny_clip_from_shards(data_dir: str | Path, out_file: str | Path, cfg: TinyClipConfig = TinyClipConfig(),
                          *, progress: bool = True) -> dict[str, float | str]:
    """``capt tiny-clip``: train on the shards' train split, save the state dict, report zero-shot accuracy."""
    from . import data as shards_data

    out = _out_file(out_file)
    register_model_configs()
    size = open_clip.get_model_config(cfg.model)["vision_cfg"]["image_size"]
    source = shards_data.ShardSource.open(data_dir)
    names, templates = shards_data.class_names(source), list(shards_data.templates(source))
    x, y, _ = shards_data.load_split(source, "train", image_size=size)
    xt, yt, _ = shards_data.load_split(source, "test", image_size=size)
    x, xt = as_pixels(x), as_pixels(xt)  # the demo data set is small
    t0 = time.perf_counter()
    model = train_tiny_clip(x, y, names, templates, cfg, progress=progress)
    seconds = time.perf_counter() - t0
    acc = zero_shot_accuracy(model, xt, yt, names, templates, cfg.model)
    _save(model, out)
    log.info("tiny-clip: zero-shot test accuracy %.3f after %.0fs -> %s", acc, seconds, out)
    return {"model": cfg.model, "checkpoint": str(out), "zero_shot_acc": acc, "train_seconds": seconds,
            "steps": cfg.steps}


def tiny_clip_from_many(data_dirs: list[str | Path], out_file: str | Path, cfg: TinyClipConfig = TinyClipConfig(),
                        *, progress: bool = True, test_limit: int | None = None) -> dict:
    """One CLIP trained on several shards folders together (the union of their classes, each with its
    own templates; every data set drawn equally often); zero-shot test accuracy reported per data set
    (over that data set's own classes and templates, on at most ``test_limit`` test images)."""
    from . import data as shards_data

    out = _out_file(out_file)
    register_model_configs()
    size = open_clip.get_model_config(cfg.model)["vision_cfg"]["image_size"]
    xs, ys, ws, names, per_class, tests = [], [], [], [], [], {}
    for path in data_dirs:
        source = shards_data.ShardSource.open(path)
        cls, tmpl = shards_data.class_names(source), list(shards_data.templates(source))
        x, y, _ = shards_data.load_split(source, "train", image_size=size)
        xt, yt, _ = shards_data.load_split(source, "test", image_size=size)
        if test_limit is not None:
            xt, yt = xt[:test_limit], yt[:test_limit]
        xs.append(x)
        ys.append(y + len(names))
        ws.append(torch.full((len(y),), 1.0 / len(y)))
        tests[str(source.meta.get("name", path))] = (xt, yt, cls, tmpl)
        names += cls
        per_class += [tmpl] * len(cls)
    if len(set(names)) != len(names):
        raise ConfigError("tiny-clip: the data sets share class names; train them together only with distinct names")
    t0 = time.perf_counter()
    model = train_tiny_clip(torch.cat(xs), torch.cat(ys), names, per_class, cfg, progress=progress,
                            weights=torch.cat(ws))
    seconds = time.perf_counter() - t0
    acc = {name: zero_shot_accuracy(model, xt, yt, cls, tmpl, cfg.model) for name, (xt, yt, cls, tmpl) in tests.items()}
    _save(model, out)
    log.info("tiny-clip: zero-shot test accuracy %s after %.0fs -> %s", acc, seconds, out)
    return {"model": cfg.model, "checkpoint": str(out), "zero_shot_acc": acc, "train_seconds": seconds,
            "steps": cfg.steps, "data": [str(p) for p in data_dirs]}


def _out_file(path: str | Path) -> Path:
    out = Path(path)
    if out.suffix != ".pt":
        raise ConfigError(f"--out: {out} should be a .pt file")
    return out


def _save(model: torch.nn.Module, out: Path) -> None:
    """The state dict, written atomically (a half-written weights file is never left at ``out``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(out)
