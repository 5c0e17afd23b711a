"""TAPT: test-time adversarial prompt tuning (arXiv 2411.13136), tuned many images at a time.

Per test image ``x``, without labels: ``views`` views (``x`` itself + RandomResizedCrop / flip views),
keep the ``keep`` views of lowest prediction entropy, loss = marginal entropy over them
+ ``weight * (alpha * L_align_adv + (1 - alpha) * L_align_clean)``
(:func:`pipeline.losses.tapt_entropy`, :func:`pipeline.losses.tapt_alignment` against
:mod:`pipeline.tapt_stats`), ``steps`` AdamW steps on every prompt parameter (text, vision and
coupling maps), then predict ``x`` with the tuned prompts. The optimiser state restarts for every
image, and so do the prompts (``reset``):

* ``trained`` (default, ours): every prompt restarts from its TRAINED value;
* ``official`` (the released TAPT code, VLI and V variants): the layer-0 text context restarts from
  its trained value, every vision prompt and every deep text prompt from its RANDOM INITIAL value
  (the value before training, saved with the run: ``PromptLearner.initial``); coupling maps keep
  their trained values (the official VLI / V designs have none). See docs/METHODS.md.

Documented choices (each a :class:`TaptConfig` field):

* ``weight`` = 400/9. The official code adds ``DISTR_LOSS_W / (ALIGN_LAYER_TO - ALIGN_LAYER_FROM)
  * sum_{l=0..7} (0.5 * L1(mu_l) + 0.5 * L1(var_l))`` with DISTR_LOSS_W = 100, TO - FROM = 9:
  100/9 times a SUM of HALVED terms over 8 layers. :func:`losses.tapt_alignment` is the MEAN over
  layers of the unhalved sum, so the same objective needs 100/9 * 8 / 2 = 400/9 here.
* ``rounding`` = floor: the official ``select_confident_samples`` keeps ``int(views * tau)`` views
  (6 of 64); ``ceil`` keeps 7 of 64. The views are chosen once, at the first step, as there.
* Views are cropped from the already resized test image (the official code crops the raw image),
  bilinearly, in pure torch (differentiable, so the adaptive attack can go through them).

Batching: B images are tuned at once, each with its own prompt copy stacked along a leading dim
(the batched forward is in :mod:`pipeline.tapt_stats`); one functional AdamW (:func:`adamw_step`)
updates the B independent optimiser states. :func:`tune_sequential` is the reference: one image at a
time, ``torch.optim.AdamW``, ``PromptedCLIP``'s own forward. :func:`adaptive_attack` attacks through
the defence; :func:`evaluate_tapt` reports both protocols (see there).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from . import losses
from .adamw import AdamWState, adamw_init, adamw_step  # noqa: F401  (AdamWState: re-exported)
from .attacks import attack_mode, build_attack, project_linf
from .config import ConfigError
from .data.pixels import as_pixels
from .prompts import FixedTextClassifier, PromptedCLIP
from .tapt_stats import (
    TaptStats,
    batched_forward,
    make_views,
    resolve_layers,
    scaled_logits,
    token_shape,
    view_generators,
)

RESETS = ("trained", "official")
PUBLISHED_WEIGHT = 400 / 9  # = official 100/9 on a sum of halved per-layer terms (see module docstring)


@dataclass(frozen=True)
class TaptConfig:
    views: int = 64  # N: the image + N - 1 augmented views
    tau: float = 0.1  # fraction of views kept (lowest entropy)
    rounding: str = "floor"  # floor (official int(N * tau): 6 of 64) | ceil
    steps: int = 1  # AdamW steps per image
    lr: float = 5e-4
    weight_decay: float = 0.01  # torch.optim.AdamW's default, as the official code leaves it
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight: float = PUBLISHED_WEIGHT
    alpha: float = 0.5  # share of the adversarial statistics in the alignment term
    layers: tuple[int, ...] | None = None  # None: 0..7, clipped to the encoder depth
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop defaults
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0  # view randomness: one generator per (seed, image index)
    reset: str = "trained"  # per-image restart: trained (ours) | official (see the module docstring)

    def __post_init__(self) -> None:
        if self.reset not in RESETS:
            raise ConfigError(f"tapt: reset must be one of {list(RESETS)}, got {self.reset!r}")
        if self.views < 1 or self.steps < 0:
            raise ConfigError(f"tapt: views must be >= 1 and steps >= 0 (got {self.views}, {self.steps})")
        if not 0 < self.tau <= 1 or self.rounding not in ("floor", "ceil"):
            raise ConfigError(f"tapt: tau must be in (0, 1] and rounding floor|ceil (got {self.tau}, {self.rounding})")
        if self.lr < 0 or self.weight < 0 or not 0 <= self.alpha <= 1:
            raise ConfigError("tapt: lr and weight must be >= 0 and alpha in [0, 1]")
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"tapt: bad crop scale {self.scale} or ratio {self.ratio}")

    @property
    def keep(self) -> int:
        """Number of confident views kept: floor or ceil of ``views * tau``, at least 1."""
        raw = self.views * self.tau
        k = math.floor(raw + 1e-9) if self.rounding == "floor" else math.ceil(raw - 1e-9)
        return min(self.views, max(1, k))


# ----------------------------------------------------------------------------- view selection


def select_confident(logits: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (..., keep) of the ``keep`` views (dim -2) of lowest entropy, most confident first."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return (-(logp.exp() * logp).sum(dim=-1)).argsort(dim=-1, stable=True)[..., :keep]


# ----------------------------------------------------------------------------- objective


def tapt_objective(logits: torch.Tensor, captured: Sequence[torch.Tensor], stats: TaptStats | None,
                   cfg: TaptConfig) -> torch.Tensor:
    """Per image (B,): marginal entropy of (B, k, C) + weight * (alpha * L_adv + (1 - alpha) * L_clean)."""
    loss = losses.tapt_entropy(logits=logits)
    if stats is None or cfg.weight == 0:
        return loss
    cap = [t.float() for t in captured]  # (B, k, T, D) each
    means = [t.mean(dim=1) for t in cap]
    variances = [(t - m[:, None]).square().mean(dim=1) for t, m in zip(cap, means, strict=True)]  # biased
    l_adv = losses.tapt_alignment(means=means, variances=variances, ref_means=stats.adv_mean, ref_vars=stats.adv_var)
    l_clean = losses.tapt_alignment(means=means, variances=variances, ref_means=stats.clean_mean,
                                    ref_vars=stats.clean_var)
    return loss + cfg.weight * (cfg.alpha * l_adv + (1 - cfg.alpha) * l_clean)


def _double_backward_attention(enabled: bool) -> contextlib.AbstractContextManager:
    """Fused attention kernels (CPU and CUDA) have no double backward: the math kernel when needed."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# ----------------------------------------------------------------------------- the defence


@dataclass
class TaptResult:
    logits: torch.Tensor  # (B, C) of the original images with the tuned prompts
    prompts: dict[str, torch.Tensor]  # tuned prompt parameters, stacked (B, ...)


def check_tunable(model: PromptedCLIP) -> None:
    if not any(True for _ in model.prompts.parameters()):
        raise ConfigError(f"tapt: prompt design {model.cfg.design!r} has no prompt parameters to tune; "
                          "use a run with learned prompts (coop, vpt, ivlp, maple, fap)")


def reset_values(model: PromptedCLIP, reset: str) -> dict[str, torch.Tensor]:
    """The prompt values every image starts from: trained, or the official mix (layer-0 text context
    trained; every other prompt tensor at its initial value; coupling maps trained)."""
    trained = {k: p.detach() for k, p in model.prompts.named_parameters()}
    if reset == "trained":
        return trained
    initial = model.prompts.initial
    if initial is None:
        raise ConfigError("tapt: reset=official needs the prompts' initial values, which this run's checkpoint "
                          "does not hold (trained before they were saved); retrain it, or use reset=trained")
    return {k: v if k == "text.0" or k.startswith("proj") else initial[k].to(v.device, v.dtype)
            for k, v in trained.items()}


class Tapt:
    """The TAPT defence for ``model`` (never modified): ``Tapt(...)(images, indices)``."""

    select_chunk = 512  # images per forward in the no-grad view-selection pass

    def __init__(self, model: PromptedCLIP, stats: TaptStats | None, cfg: TaptConfig):
        check_tunable(model)
        self.model, self.cfg = model, cfg
        self.layers = resolve_layers(cfg.layers, model.n_vision_layers) if cfg.weight > 0 else ()
        if cfg.weight > 0 and stats is None:
            raise ConfigError("tapt: the alignment term (weight > 0) needs reference statistics (--stats)")
        device = model.mean.device
        self.stats = stats.select(self.layers, device) if self.layers else None
        if self.stats is not None:
            self.stats.check_shape(*token_shape(model))

    def initial(self, batch: int) -> dict[str, torch.Tensor]:
        """B fresh copies of the prompts each image starts from (the per-image reset, ``cfg.reset``)."""
        start = reset_values(self.model, self.cfg.reset)
        return {k: p.unsqueeze(0).expand(batch, *p.shape).clone() for k, p in start.items()}

    @torch.no_grad()
    def select(self, views: torch.Tensor, start: dict[str, torch.Tensor]) -> torch.Tensor:
        """Confident views (B, k), chosen with the prompts each image starts from (``start``, (B, ...)),
        as the official code selects with the freshly reset prompts: with ``reset=trained`` that is the
        model's own prompts (shared by all images: one chunked pass), else a batched pass."""
        b, v = views.shape[:2]
        if self.cfg.reset != "trained":  # chunks of images: select_chunk views per forward at most
            step = max(1, self.select_chunk // v)
            logits = torch.cat([batched_forward(self.model, {k: p[i:i + step] for k, p in start.items()},
                                                views[i:i + step].detach())[0] for i in range(0, b, step)])
            return select_confident(logits, self.cfg.keep)
        flat = views.detach().flatten(0, 1)  # chunks bound the memory of B * V images
        feats = torch.cat([self.model.image_features(c) for c in flat.split(self.select_chunk)])
        logits = scaled_logits(self.model, feats.view(b, v, -1), self.model.text_features())
        return select_confident(logits, self.cfg.keep)

    def tune(self, images: torch.Tensor, gens: Sequence[torch.Generator], *,
             create_graph: bool = False) -> dict[str, torch.Tensor]:
        """Tuned prompts (B, ...) of B images; ``create_graph``: differentiable in ``images``."""
        cfg = self.cfg
        views = make_views(images, cfg.views, gens, scale=cfg.scale, ratio=cfg.ratio)
        params = {k: v.requires_grad_(True) for k, v in self.initial(len(images)).items()}
        idx = self.select(views, {k: v.detach() for k, v in params.items()})
        kept = views[torch.arange(len(images), device=idx.device)[:, None], idx]  # (B, k, 3, H, W)
        state = adamw_init(params)
        for _ in range(cfg.steps):
            with torch.enable_grad(), _double_backward_attention(create_graph):
                logits, cap = batched_forward(self.model, params, kept, self.layers)
                loss = tapt_objective(logits, cap, self.stats, cfg).sum()  # images are independent
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph,
                                            materialize_grads=True)
            params, state = adamw_step(params, dict(zip(params, grads, strict=True)), state, lr=cfg.lr,
                                       betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
            if not create_graph:
                params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        return params

    def predict(self, params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return batched_forward(self.model, params, images[:, None])[0][:, 0]

    def __call__(self, images: torch.Tensor, indices: Sequence[int] | None = None) -> TaptResult:
        indices = range(len(images)) if indices is None else indices
        params = self.tune(images, view_generators(self.cfg.seed, indices))
        with torch.no_grad():
            logits = self.predict(params, images)
        return TaptResult(logits, {k: v.detach() for k, v in params.items()})


class _ModelFn(nn.Module):
    def __init__(self, model: PromptedCLIP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.model.image_features(images, capture=list(layers))
        feats, cap = out if layers else (out, [])
        return scaled_logits(self.model, feats[None], self.model.text_features())[0], cap


def tune_sequential(model: PromptedCLIP, images: torch.Tensor, stats: TaptStats | None, cfg: TaptConfig,
                    indices: Sequence[int] | None = None) -> TaptResult:
    """Reference TAPT, one image at a time as the official code: all views forward with gradient,
    ``torch.optim.AdamW`` on fresh prompt copies, ``PromptedCLIP``'s own forward."""
    ref = Tapt(model, stats, cfg)
    fn, names = _ModelFn(model), [k for k, _ in model.prompts.named_parameters()]
    indices = range(len(images)) if indices is None else indices
    logits, tuned = [], []
    for b, gen in enumerate(view_generators(cfg.seed, indices)):
        views = make_views(images[b:b + 1], cfg.views, [gen], scale=cfg.scale, ratio=cfg.ratio)[0]  # (V, 3, H, W)
        params = {k: v[0].requires_grad_(True) for k, v in ref.initial(1).items()}
        opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
        sub = {f"model.prompts.{k}": params[k] for k in names}
        idx = None
        for _ in range(cfg.steps):
            with torch.enable_grad():
                out, cap = functional_call(fn, sub, (views, ref.layers))
                idx = select_confident(out.detach(), cfg.keep) if idx is None else idx
                loss = tapt_objective(out[idx][None], [t[idx][None] for t in cap], ref.stats, cfg).sum()
                grads = torch.autograd.grad(loss, list(params.values()), materialize_grads=True)
            for p, g in zip(params.values(), grads, strict=True):
                p.grad = g
            opt.step()
        with torch.no_grad():
            logits.append(functional_call(fn, sub, (images[b:b + 1], ()))[0])
        tuned.append({k: v.detach() for k, v in params.items()})
    return TaptResult(torch.cat(logits), {k: torch.stack([t[k] for t in tuned]) for k in names})


# ----------------------------------------------------------------------------- adaptive attack


def adaptive_attack(tapt: Tapt, x: torch.Tensor, y: torch.Tensor, x_start: torch.Tensor, *, eps: float,
                    steps: int, step_size: float, eot: int = 1, seed: int = 0,
                    indices: Sequence[int] | None = None) -> torch.Tensor:
    """l-inf PGD through the defence, from ``x_start`` (the transfer example).

    Each step ascends ``sum_e CE(f(x; theta'_e(x)), y)`` where ``theta'_e(x)`` are the prompts TAPT
    tunes from a FRESH random draw ``e`` of views of ``x`` (EOT over ``eot`` draws per step); the
    gradient flows through the views, the tuning loss and the AdamW update (create_graph); the view
    selection is a non-differentiable index. Gradients are taken wrt the input only.
    """
    indices = range(len(x)) if indices is None else indices
    x_adv = x_start.detach().clone()
    with attack_mode(tapt.model):
        for t in range(steps):
            grad = torch.zeros_like(x)
            for e in range(eot):
                gens = view_generators(seed, indices, stream=1 + t * eot + e)
                x_var = x_adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    params = tapt.tune(x_var, gens, create_graph=True)
                    loss = F.cross_entropy(tapt.predict(params, x_var).float(), y, reduction="sum")
                    grad += torch.autograd.grad(loss, x_var)[0]
            x_adv = project_linf(x_adv + step_size * grad.sign(), x, eps)
    return x_adv.detach()


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class TaptEvalConfig:
    eps: float = 1.0  # l-inf radius in 1/255 units (the TAPT paper's evaluation: 1/255)
    attack: str = "pgd"  # transfer attack against the base prompts: pgd | autoattack
    attack_steps: int = 100
    adaptive: bool = True
    adaptive_steps: int = 10
    adaptive_step_size: float | None = None  # 1/255 units; default max(eps / 4, 2.5 * eps / steps)
    eot: int = 1  # fresh view draws averaged per adaptive step
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.eps <= 255:
            raise ConfigError(f"--eps: {self.eps} out of range [0, 255] (units of 1/255)")
        if self.attack not in ("pgd", "autoattack"):
            raise ConfigError(f"--attack: {self.attack!r} is not one of ['pgd', 'autoattack']")
        if min(self.attack_steps, self.adaptive_steps) < 0 or self.eot < 1 or self.batch_size < 1:
            raise ConfigError("tapt: attack steps must be >= 0, eot >= 1, batch size >= 1")


def evaluate_tapt(model: PromptedCLIP, x: torch.Tensor, y: torch.Tensor, stats: TaptStats | None,
                  cfg: TaptConfig, ev: TaptEvalConfig, *, device: torch.device | str = "cpu",
                  progress: bool = False) -> dict[str, float]:
    """Accuracies (fractions), with and without TAPT, under both protocols.

    ``clean_acc`` / ``robust_acc``: base prompts (no TAPT), on clean images / on ``x_adv`` crafted
    against the base prompts. ``tapt_clean_acc`` / ``tapt_robust_acc``: TAPT on the clean images /
    on that same ``x_adv`` (the paper's protocol: the attack never sees the tuning). PGD's ``x_adv``
    is its final iterate, as the paper's cached examples: first-fooling iterates sit just across the
    boundary, where any small change of the model (such as TAPT's) "recovers" them.
    ``adaptive_robust_acc``: an image counts as robust only if TAPT classifies BOTH ``x_adv`` and
    the output of :func:`adaptive_attack` started from ``x_adv`` correctly (per-sample worst case),
    so it is never above ``tapt_robust_acc``. TAPT uses the same views per image index everywhere.
    """
    model.eval()
    tapt = Tapt(model, stats, cfg)
    with torch.no_grad():
        classifier = FixedTextClassifier(model, model.text_features())
    eps = ev.eps / 255.0
    attack = build_attack(ev.attack, eps=eps, steps=ev.attack_steps, n_classes=len(model.classnames),
                          module=model, seed=ev.seed, keep_best=False)
    ada_step = (ev.adaptive_step_size / 255.0 if ev.adaptive_step_size is not None
                else max(eps / 4, 2.5 * eps / max(ev.adaptive_steps, 1)))
    hits = dict.fromkeys(("clean_acc", "robust_acc", "tapt_clean_acc", "tapt_robust_acc", "adaptive_robust_acc"), 0)
    tapt_time = 0.0
    for i in tqdm(range(0, len(y), ev.batch_size), desc="tapt", disable=not progress):
        xb, yb = as_pixels(x[i:i + ev.batch_size].to(device)), y[i:i + ev.batch_size].to(device)
        idx = range(i, i + len(yb))
        x_adv = attack(classifier, xb, yb)
        with torch.no_grad():
            hits["clean_acc"] += int((classifier(xb).argmax(1) == yb).sum())
            hits["robust_acc"] += int((classifier(x_adv).argmax(1) == yb).sum())
        start = _now(device)
        hits["tapt_clean_acc"] += int((tapt(xb, idx).logits.argmax(1) == yb).sum())
        tapt_time += _now(device) - start
        robust = tapt(x_adv, idx).logits.argmax(1) == yb
        hits["tapt_robust_acc"] += int(robust.sum())
        if ev.adaptive and eps > 0 and ev.adaptive_steps > 0:
            x_ada = adaptive_attack(tapt, xb, yb, x_adv, eps=eps, steps=ev.adaptive_steps, step_size=ada_step,
                                    eot=ev.eot, seed=ev.seed, indices=idx)
            robust &= tapt(x_ada, idx).logits.argmax(1) == yb
        hits["adaptive_robust_acc"] += int(robust.sum())
    n = max(len(y), 1)
    out: dict[str, float] = {k: v / n for k, v in hits.items()}
    if not ev.adaptive:
        out["adaptive_robust_acc"] = float("nan")
    out.update(n_images=len(y), tapt_s_per_image=tapt_time / n, keep_views=cfg.keep)
    return out


def _now(device: torch.device | str) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()
