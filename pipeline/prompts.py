"""Prompt designs and the prompted CLIP model.

All CLIP weights stay frozen; only :class:`PromptLearner` parameters train. Designs (a registry,
``DESIGNS``), each a choice of which encoders get learned tokens and how they are coupled:

========  =====================================================================================
none      zero-shot CLIP: hand-written templates, no learned tokens
coop      text context only (CoOp / APT); ``depth`` > 1 makes it deep text prompting
vpt       vision prompts only (deep visual prompt tuning, TAPT-V)
ivlp      independent text + vision deep prompts (IVLP / AdvVLP, CAPT's default)
maple     vision prompt of each layer = Linear_l(text prompt of that layer) (MaPLe / AdvMaPLe)
fap       text prompt of layer 0 learned; deeper text prompts = Linear_l(vision prompt) (FAP-style)
========  =====================================================================================

FAP's layer-0 vision prompt (``prompt.fap_layer0``): ``separate`` (default) learns it as its own
parameter; ``coupled`` makes it ``Linear_0(text context)`` as the official FAP code does (MaPLe-style
at layer 0, vision-to-text deeper). See docs/METHODS.md.

Initial values: :class:`PromptLearner` keeps a copy of every prompt tensor as it was initialised
(``initial``); :meth:`PromptedCLIP.prompt_state` saves them (keys ``initial/<name>``) so that TAPT can
reset prompts to them as the official code does (``tapt --reset official``).

Text prompts replace the ``n_ctx`` tokens after start-of-text ("X X ... X {class}."); vision
prompts are appended after the patch tokens. At every layer ``1 <= l < depth`` the prompt tokens
are replaced by that layer's prompt (deep prompting, as in MaPLe/IVLP).

Text context trimming: with a causal mask, the end-of-text feature depends only on tokens before
it, so the context is cut to the longest real prompt instead of 77 tokens (same logits, much less
text-tower work; ``benchmarks/bench_text.py`` measures it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip import LoadedClip
from .config import ConfigError, PromptConfig


@dataclass(frozen=True)
class DesignSpec:
    text: bool
    vision: bool
    coupling: str | None = None  # None | "t2v" (MaPLe) | "v2t" (FAP)


DESIGNS: dict[str, DesignSpec] = {}


def register_design(name: str, spec: DesignSpec) -> None:
    if name in DESIGNS:
        raise KeyError(f"prompt design {name!r} is already registered")
    DESIGNS[name] = spec


for _name, _spec in {
    "none": DesignSpec(False, False),
    "coop": DesignSpec(True, False),
    "vpt": DesignSpec(False, True),
    "ivlp": DesignSpec(True, True),
    "maple": DesignSpec(True, True, "t2v"),
    "fap": DesignSpec(True, True, "v2t"),
}.items():
    register_design(_name, _spec)


INITIAL = "initial/"  # prefix of the initial prompt values in prompt_state()


class PromptLearner(nn.Module):
    """The trainable tokens of one design: per-layer text / vision prompts and coupling maps."""

    def __init__(self, spec: DesignSpec, *, n_text: int, n_vision: int, depth: int,
                 d_text: int, d_vision: int, text_init: torch.Tensor | None = None, fap_layer0: str = "separate"):
        super().__init__()
        self.spec, self.depth, self.n_text, self.n_vision = spec, depth, n_text, n_vision
        # v2t with a coupled layer 0: vision prompts of layers 1.. only, layer 0 = proj0(text context)
        self.coupled0 = spec.coupling == "v2t" and fap_layer0 == "coupled"
        t_layers = 0 if not spec.text else (1 if spec.coupling == "v2t" else depth)
        v_layers = 0 if not spec.vision else (0 if spec.coupling == "t2v" else depth - self.coupled0)
        self.text = nn.ParameterList([nn.Parameter(torch.randn(n_text, d_text) * 0.02) for _ in range(t_layers)])
        self.vision = nn.ParameterList(
            [nn.Parameter(torch.randn(n_vision, d_vision) * 0.02) for _ in range(v_layers)])
        if spec.coupling == "t2v":
            self.proj = nn.ModuleList([nn.Linear(d_text, d_vision) for _ in range(depth)])
        elif spec.coupling == "v2t":
            self.proj = nn.ModuleList([nn.Linear(d_vision, d_text) for _ in range(depth - 1)])
        else:
            self.proj = nn.ModuleList()
        if self.coupled0:
            self.proj0 = nn.Linear(d_text, d_vision)
        if text_init is not None and t_layers:
            k = min(n_text, text_init.shape[0])
            with torch.no_grad():
                self.text[0][:k].copy_(text_init[:k])
        # the values every prompt tensor started from (None once unknown: a checkpoint without them)
        self.initial: dict[str, torch.Tensor] | None = {k: p.detach().cpu().clone()
                                                       for k, p in self.named_parameters()}

    def text_prompts(self) -> list[torch.Tensor]:
        """Per-layer text prompts, ``[(n_text, D_t)] * depth`` (empty for vision-only designs)."""
        if not self.spec.text:
            return []
        if self.spec.coupling == "v2t":
            deep = list(self.vision) if self.coupled0 else list(self.vision)[1:]
            return [self.text[0]] + [p(v) for p, v in zip(self.proj, deep, strict=True)]
        return list(self.text)

    def vision_prompts(self) -> list[torch.Tensor]:
        """Per-layer vision prompts, ``[(n_vision, D_v)] * depth`` (empty for text-only designs)."""
        if not self.spec.vision:
            return []
        if self.spec.coupling == "t2v":
            return [p(t) for p, t in zip(self.proj, self.text, strict=True)]
        if self.coupled0:
            return [self.proj0(self.text[0])] + list(self.vision)
        return list(self.vision)


class _TextTower:
    """Uniform access to the text tower of open_clip's CLIP and CustomTextCLIP."""

    def __init__(self, clip: nn.Module):
        t = clip.text if hasattr(clip, "text") else clip
        if getattr(t, "cls_emb", None) is not None:
            raise ConfigError("model.name: text towers with a class token (CoCa) are not supported")
        self.token_embedding = t.token_embedding
        self.positional_embedding = t.positional_embedding
        self.blocks = t.transformer.resblocks
        self.batch_first = getattr(t.transformer, "batch_first", True)
        self.ln_final = t.ln_final
        self.projection = t.text_projection
        self._tower = t  # attn_mask is read through it: Module.to() replaces buffers (parameters stay)
        self.pool_type = t.pool_type if hasattr(clip, "text") else clip.text_pool_type
        self.eos_id = getattr(t, "eos_id", None) if hasattr(clip, "text") else getattr(clip, "text_eos_id", None)
        self.width = self.token_embedding.weight.shape[1]

    @property
    def attn_mask(self) -> torch.Tensor | None:
        return self._tower.attn_mask

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        raise ConfigError(f"model.name: text pooling {self.pool_type!r} is not supported")

    def forward(self, x: torch.Tensor, eot: torch.Tensor, deep: Sequence[torch.Tensor] = (),
                n_ctx: int = 0) -> torch.Tensor:
        """Token embeddings ``x`` (C, L, D) -> projected end-of-text features (C, E)."""
        n, length = x.shape[:2]
        x = x + self.positional_embedding[:length].to(x.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        for i, blk in enumerate(self.blocks):
            if 0 < i < len(deep):  # deep prompting: this layer's own context tokens
                ctx = deep[i].to(x.dtype).unsqueeze(0).expand(n, -1, -1)
                x = torch.cat([x[:, :1], ctx, x[:, 1 + n_ctx:]], dim=1)
            x = blk(x, attn_mask=mask) if self.batch_first else blk(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        x = self.ln_final(x)
        pooled = x[torch.arange(n, device=x.device), eot]  # (C, D)
        if self.projection is None:
            return pooled
        if isinstance(self.projection, nn.Linear):
            return self.projection(pooled)
        return pooled @ self.projection


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` (a no-op where the device type has no autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def class_logits(clip: nn.Module, img: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """logit_scale * img @ text.T (+ bias) for normalised features (B, E) x (C, E) -> (B, C), in float32.

    Always float32, also under bf16 autocast: bf16 keeps 8 significant bits, so logits of 16 to 128
    (logit_scale up to 100) would be rounded to steps of 0.125 to 0.5, a floor under the KL terms
    between nearby predictions; this product is B x E x C, negligible next to the towers. (On random
    weights the towers' own bf16 rounding dominates the step's error: tests/test_gpu.py.)
    """
    with no_autocast(img.device):
        out = clip.logit_scale.exp().float() * img.float() @ text.float().t()
        bias = getattr(clip, "logit_bias", None)
        return out + bias.float() if bias is not None else out


def _trim(tokens: torch.Tensor, eot: torch.Tensor, enabled: bool) -> torch.Tensor:
    return tokens[:, : int(eot.max()) + 1] if enabled else tokens


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP with a prompt design; inputs are raw pixels in [0, 1]."""

    def __init__(self, loaded: LoadedClip, cfg: PromptConfig, classnames: Sequence[str],
                 templates: Sequence[str], *, trim_context: bool = True):
        super().__init__()
        if cfg.design not in DESIGNS:
            raise ConfigError(f"prompt.design: unknown design {cfg.design!r}; choose from {sorted(DESIGNS)}")
        self.clip, self.tokenizer, self.cfg, self.trim = loaded.model, loaded.tokenizer, cfg, trim_context
        self.spec = DESIGNS[cfg.design]
        self.text_tower = _TextTower(self.clip)
        # on the CLIP's device from the start: the label space (tokens, text features) is built below
        device = self.clip.logit_scale.device
        self.register_buffer("mean", torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(loaded.std, device=device).view(1, 3, 1, 1), persistent=False)
        self.image_size = loaded.image_size
        visual = self.clip.visual
        self.n_vision_layers = len(visual.transformer.resblocks) if hasattr(visual, "transformer") else 0
        self._check_design(cfg)
        text_init = self._init_embeddings(cfg.init) if self.spec.text and cfg.init else None
        d_vision = visual.conv1.out_channels if self.spec.vision else 1
        self.prompts = PromptLearner(
            self.spec, n_text=cfg.n_ctx_text, n_vision=cfg.n_ctx_vision, depth=cfg.depth,
            d_text=self.text_tower.width, d_vision=d_vision, text_init=text_init, fap_layer0=cfg.fap_layer0,
        ).to(self.mean.device)
        self.set_classes(classnames, templates)

    # ------------------------------------------------------------------ setup
    def _check_design(self, cfg: PromptConfig) -> None:
        if self.spec.vision and not hasattr(self.clip.visual, "conv1"):
            raise ConfigError(f"prompt.design={cfg.design} needs a ViT image tower")
        if self.spec.coupling and cfg.n_ctx_text != cfg.n_ctx_vision:
            raise ConfigError(f"prompt.design={cfg.design} couples text and vision prompts: "
                              f"n_ctx_text ({cfg.n_ctx_text}) must equal n_ctx_vision ({cfg.n_ctx_vision})")
        if self.spec.text and cfg.depth > len(self.text_tower.blocks):
            raise ConfigError(f"prompt.depth={cfg.depth} is deeper than the text encoder "
                              f"({len(self.text_tower.blocks)} layers)")
        if self.spec.vision and cfg.depth > self.n_vision_layers:
            raise ConfigError(f"prompt.depth={cfg.depth} is deeper than the image encoder "
                              f"({self.n_vision_layers} layers)")

    @torch.no_grad()
    def _init_embeddings(self, words: str) -> torch.Tensor:
        tokens = self.tokenizer([words]).to(self.mean.device)
        eot = int(self.text_tower.eot_index(tokens)[0])
        return self.text_tower.token_embedding(tokens)[0, 1:eot].float()  # (n_words, D)

    @torch.no_grad()
    def set_classes(self, classnames: Sequence[str], templates: Sequence[str]) -> None:
        """Set the label space: frozen (template) text features and the tuned prompts' token buffers."""
        if not classnames or not templates:
            raise ConfigError("data: a task needs at least one class name and one prompt template")
        self.classnames, self.templates = list(classnames), list(templates)
        self.register_buffer("frozen_text", self._template_features(), persistent=False)
        if self.spec.text:
            n = self.cfg.n_ctx_text
            texts = [" ".join(["X"] * n) + " " + c.replace("_", " ") + "." for c in self.classnames]
            tokens = self.tokenizer(texts).to(self.mean.device)
            eot = self.text_tower.eot_index(tokens)
            tokens = _trim(tokens, eot, self.trim)
            emb = self.text_tower.token_embedding(tokens)  # (C, L, D)
            self.register_buffer("tok_prefix", emb[:, :1].clone(), persistent=False)  # start-of-text
            self.register_buffer("tok_suffix", emb[:, 1 + n:].clone(), persistent=False)  # class, ".", eot
            self.register_buffer("tok_eot", eot, persistent=False)

    def _template_features(self, chunk: int = 512) -> torch.Tensor:
        """Mean over templates of normalised text features, renormalised (CLIP's prompt ensemble)."""
        feats = []
        for c in self.classnames:
            feats.extend(t.format(c.replace("_", " ")) for t in self.templates)
        out = []
        for i in range(0, len(feats), chunk):
            tokens = self.tokenizer(feats[i:i + chunk]).to(self.mean.device)
            eot = self.text_tower.eot_index(tokens)
            tokens = _trim(tokens, eot, self.trim)
            x = self.text_tower.token_embedding(tokens)
            out.append(F.normalize(self.text_tower.forward(x, eot).float(), dim=-1))
        per = torch.cat(out).view(len(self.classnames), len(self.templates), -1).mean(dim=1)
        return F.normalize(per, dim=-1)  # (C, E)

    # ------------------------------------------------------------------ forward pieces
    def text_features(self) -> torch.Tensor:
        """Normalised class text features of the tuned model (C, E); differentiable in the prompts."""
        if not self.spec.text:
            return self.frozen_text
        deep = self.prompts.text_prompts()
        c = self.tok_prefix.shape[0]
        ctx = deep[0].to(self.tok_prefix.dtype).unsqueeze(0).expand(c, -1, -1)
        x = torch.cat([self.tok_prefix, ctx, self.tok_suffix], dim=1)  # (C, L, D)
        feats = self.text_tower.forward(x, self.tok_eot, deep, self.cfg.n_ctx_text)
        return F.normalize(feats.float(), dim=-1)

    def image_features(self, images: torch.Tensor, *, prompted: bool = True,
                       capture: Sequence[int] = ()) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised image features (B, E) of raw [0, 1] pixels.

        ``capture``: vision layers whose input tokens (B, T, D) are also returned (used by TAPT).
        """
        x = (images - self.mean) / self.std
        if not (prompted and self.spec.vision) and not capture:
            return F.normalize(self.clip.encode_image(x).float(), dim=-1)
        prompts = self.prompts.vision_prompts() if prompted else []
        feats, captured = self._vision_forward(x, prompts, set(capture))
        feats = F.normalize(feats.float(), dim=-1)
        return (feats, captured) if capture else feats

    def _vision_forward(self, x: torch.Tensor, prompts: Sequence[torch.Tensor],
                        capture: set[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        v = self.clip.visual
        x = v.conv1(x)  # (B, D, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, g*g, D)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1+g*g, D)
        x = v.patch_dropout(x)
        n = prompts[0].shape[0] if prompts else 0
        if prompts:
            x = torch.cat([x, prompts[0].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x)
        captured = []
        batch_first = getattr(v.transformer, "batch_first", True)
        for i, blk in enumerate(v.transformer.resblocks):
            if 0 < i < len(prompts):
                x = torch.cat([x[:, :-n], prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
            if i in capture:
                captured.append(x)
            x = blk(x) if batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
        if n:
            x = x[:, :-n]  # drop prompt tokens before pooling
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled, captured

    def logits(self, images: torch.Tensor, text_features: torch.Tensor, *, prompted: bool = True) -> torch.Tensor:
        """logit_scale * cos(image, class text) (+ bias), (B, C), in float32 (see :func:`class_logits`)."""
        return class_logits(self.clip, self.image_features(images, prompted=prompted), text_features)

    def frozen_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The pre-trained CLIP with hand-written templates (the consistency guide)."""
        return self.logits(images, self.frozen_text, prompted=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images, self.text_features())

    # ------------------------------------------------------------------ state
    def prompt_state(self) -> dict[str, torch.Tensor]:
        """The prompt weights, plus their initial values under ``initial/<name>`` when known."""
        state = {k: v.detach().cpu().clone() for k, v in self.prompts.state_dict().items()}
        initial = self.prompts.initial or {}
        return {**state, **{f"{INITIAL}{k}": v.clone() for k, v in initial.items()}}

    def load_prompt_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        weights = {k: v for k, v in state.items() if not k.startswith(INITIAL)}
        initial = {k.removeprefix(INITIAL): v for k, v in state.items() if k.startswith(INITIAL)}
        try:
            self.prompts.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"{source}: prompt weights do not match prompt.design={self.cfg.design} "
                              f"depth={self.cfg.depth} fap_layer0={self.cfg.fap_layer0}: {first}") from None
        names = {k for k, _ in self.prompts.named_parameters()}
        self.prompts.initial = {k: v.detach().cpu().clone() for k, v in initial.items()} if set(initial) == names else None


class FixedTextClassifier(nn.Module):
    """images -> logits with text features fixed (an nn.Module, for attack libraries)."""

    def __init__(self, model: PromptedCLIP, text_features: torch.Tensor, *, prompted: bool = True):
        super().__init__()
        self.model, self.prompted = model, prompted
        self.register_buffer("text_features", text_features.detach(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.logits(images, self.text_features, prompted=self.prompted)
