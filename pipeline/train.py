"""One training run of any method of the family: ``train(cfg, task, report=...) -> TrainResult``.

Methods differ only by configuration (prompt design, objective, training attack); the objective
registry ``OBJECTIVES`` maps ``loss.objective`` to a function of a :class:`Step`, which computes
each quantity (adversarial images, tuned / frozen logits, image features) at most once per step.
No ray, no mlflow: progress leaves through the ``report`` callback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import losses
from .attacks import build_attack
from .clip import load_clip
from .config import Config, ConfigError, eval_eps
from .data import augment
from .evaluate import accuracy
from .prompts import PromptedCLIP, class_logits
from .task import TaskData

log = logging.getLogger(__name__)
Report = Callable[[dict[str, Any], Path | None], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``optim.amp``; a no-op on CPU."""
    if device.type == "cuda" and cfg.optim.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: Config, classnames: list[str], templates: list[str], device: torch.device) -> PromptedCLIP:
    loaded = load_clip(cfg.model, device)
    return PromptedCLIP(loaded, cfg.prompt, classnames, templates, trim_context=cfg.model.trim_context).to(device)


# ----------------------------------------------------------------------------- one step

@dataclass
class Step:
    """Lazily computed, cached quantities of one training step.

    Each pass runs at most once per step: the text tower (once, with gradient), the attack, the
    tuned image tower and the frozen one. ``fuse``: an objective that needs the tuned model on both
    the clean and the adversarial images (CAPT, FAP) gets both from ONE image-tower pass on
    ``cat([x, x_adv])`` (:meth:`pair_logits`), which on a GPU means half the kernel launches and
    fuller kernels; ``fuse=False`` runs two passes (same values up to float rounding, see
    tests/test_fastpath.py; ``benchmarks/bench_step.py`` times both).
    """

    model: PromptedCLIP
    cfg: Config
    x: torch.Tensor
    y: torch.Tensor
    attack: Any
    fuse: bool = True
    text: torch.Tensor = field(init=False)  # tuned class text features, once per step
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.text = self.model.text_features()

    def _get(self, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def x_adv(self) -> torch.Tensor:
        def run() -> torch.Tensor:
            text = self.text.detach()  # reused by every attack iteration
            return self.attack(lambda z: self.model.logits(z, text), self.x, self.y)
        return self._get("x_adv", run)

    def features(self, which: str) -> torch.Tensor:
        src = self.x if which == "clean" else self.x_adv()
        return self._get(f"feat_{which}", lambda: self.model.image_features(src))

    def pair_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tuned image features of (clean, adversarial) images; one pass on both when fusing."""
        if self.fuse and "feat_clean" not in self._cache and "feat_adv" not in self._cache:
            both = self.model.image_features(torch.cat([self.x, self.x_adv()]))
            self._cache["feat_clean"], self._cache["feat_adv"] = both.split(len(self.x))
        return self.features("clean"), self.features("adv")

    def logits(self, which: str) -> torch.Tensor:
        return self._get(f"logits_{which}", lambda: class_logits(self.model.clip, self.features(which), self.text))

    def pair_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tuned logits of (clean, adversarial) images, from :meth:`pair_features`."""
        self.pair_features()
        return self.logits("clean"), self.logits("adv")

    def frozen_logits(self, which: str) -> torch.Tensor:
        """The frozen CLIP's logits, without gradient and in eval mode (a frozen guide has no
        train-mode behaviour; eval also lets torch use its fused inference attention)."""
        def run() -> torch.Tensor:
            src = self.x if which == "clean" else self.x_adv()
            clip, was_training = self.model.clip, self.model.clip.training
            clip.eval()
            try:
                with torch.no_grad():
                    return self.model.frozen_logits(src)
            finally:
                clip.train(was_training)
        return self._get(f"frozen_{which}", run)


def _capt(s: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    clean, adv = s.pair_logits()
    frozen = s.frozen_logits(s.cfg.loss.frozen_input)
    return losses.capt_loss(logits_adv=adv, logits_clean=clean, frozen_logits=frozen, labels=s.y,
                            lam=s.cfg.loss.lam, alpha_rule=s.cfg.loss.alpha_rule, alpha=s.cfg.loss.alpha)


def _fap(s: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    clean, adv = s.pair_logits()
    feat_clean, feat_adv = s.pair_features()
    return losses.fap_loss(logits_clean=clean, logits_adv=adv, feat_clean=feat_clean, feat_adv=feat_adv,
                           labels=s.y, weight=s.cfg.loss.fap_weight)


Objective = Callable[[Step], tuple[torch.Tensor, dict[str, torch.Tensor]]]
OBJECTIVES: dict[str, Objective] = {
    "ce_clean": lambda s: (losses.cross_entropy(logits=s.logits("clean"), labels=s.y), {}),
    "ce_adv": lambda s: (losses.cross_entropy(logits=s.logits("adv"), labels=s.y), {}),
    "capt": _capt,
    "fap": _fap,
}


def make_train_attack(cfg: Config, model: PromptedCLIP):
    a = cfg.attack
    if a.name == "none":
        return None
    return build_attack(a.name, eps=a.eps_px, steps=a.steps, step_size=a.step_px, loss=a.loss,
                        random_start=a.random_start, module=model, seed=None, keep_best=False)


def lr_at(cfg: Config, epoch: int) -> float:
    """Constant warm-up (``warmup_lr``) for ``warmup_epochs``, then cosine decay over the rest."""
    o = cfg.optim
    if epoch < o.warmup_epochs:
        return o.warmup_lr
    span = max(o.epochs - o.warmup_epochs, 1)
    return 0.5 * o.lr * (1 + math.cos(math.pi * (epoch - o.warmup_epochs) / span))


# ----------------------------------------------------------------------------- the run

@dataclass
class TrainResult:
    model: PromptedCLIP
    history: list[dict[str, Any]]
    metrics: dict[str, Any]  # last epoch's metrics
    checkpoint: Path | None


def train(cfg: Config, task: TaskData, *, report: Report | None = None, out_dir: str | Path | None = None,
          resume_from: str | Path | None = None, device: torch.device | None = None) -> TrainResult:
    """Train ``cfg.method`` prompts on ``task``; checkpoint each epoch; resume when a checkpoint exists."""
    device = device or resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, task.classnames, task.templates, device)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoints" / "last.pt" if out is not None else None
    params = [p for p in model.prompts.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay) if params else None
    history: list[dict[str, Any]] = []
    start = 0
    source = Path(resume_from) if resume_from is not None else ckpt_path
    if source is not None and source.is_file():
        start, history = load_checkpoint(source, cfg, model, opt)
        log.info("resumed from %s at epoch %d", source, start)
    if opt is None or cfg.loss.objective == "none":
        start = cfg.optim.epochs  # zero-shot: nothing to train
    attack = make_train_attack(cfg, model)
    objective = OBJECTIVES.get(cfg.loss.objective)
    for epoch in range(start, cfg.optim.epochs):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        stats = train_epoch(model, cfg, task, attack, objective, opt, epoch, device)
        stats.update(evaluate_epoch(model, cfg, task, device))
        stats.update(epoch=epoch + 1, lr=opt.param_groups[0]["lr"], epoch_time_s=time.perf_counter() - t0)
        history.append(stats)
        if ckpt_path is not None and ((epoch + 1) % cfg.run.checkpoint_every == 0 or epoch + 1 == cfg.optim.epochs):
            save_checkpoint(ckpt_path, cfg, model, opt, epoch + 1, history)
        log.info("epoch %d/%d loss %.4f clean %.3f robust %.3f (%.1fs)", epoch + 1, cfg.optim.epochs,
                 stats["loss"], stats["clean_acc"], stats["robust_acc"], stats["epoch_time_s"])
        if report is not None:
            report(dict(stats), ckpt_path)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"prompts": model.prompt_state(), "config": cfg.to_dict(), "classnames": task.classnames,
                    "templates": task.templates}, out / "prompts.pt")
    metrics = dict(history[-1]) if history else evaluate_epoch(model, cfg, task, device)
    return TrainResult(model, history, metrics, ckpt_path)


def train_epoch(model: PromptedCLIP, cfg: Config, task: TaskData, attack, objective: Objective,
                opt: torch.optim.Optimizer, epoch: int, device: torch.device) -> dict[str, float]:
    """One pass over the training set (augmented per ``data.augment``); returns the sample-weighted
    mean loss and loss parts.

    The sums stay on the device (float64: the same numbers as summing ``.item()`` values) and are
    read once per epoch, so a GPU step never waits for the host. A non-finite loss is therefore
    reported at the end of its epoch (before that epoch's evaluation or checkpoint), not mid-epoch.
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    finite = torch.ones((), dtype=torch.bool, device=device)
    n = 0
    g = augment.generator(cfg.run.seed, epoch)
    for x, y in task.batches(cfg.optim.batch_size, epoch=epoch, seed=cfg.run.seed):
        x = augment.augment(x, cfg.data.augment, g)  # the attack below is crafted on the augmented batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(cfg, device):
            loss, parts = objective(Step(model, cfg, x, y, attack))
        finite = finite & torch.isfinite(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        terms = {"loss": loss, **{(f"loss_{k}" if k != "alpha" else "alpha"): v for k, v in parts.items()}}
        for key, value in terms.items():
            sums[key] = sums.get(key, 0) + torch.as_tensor(value, device=device).detach().double() * len(y)
        n += len(y)
    model.eval()
    if not bool(finite):  # the epoch's one host-device sync, with the line below
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} (lr {opt.param_groups[0]['lr']:.3g})")
    values = torch.stack(list(sums.values())).tolist() if sums else []
    return {k: v / max(n, 1) for k, v in zip(sums, values, strict=True)}


def evaluate_epoch(model: PromptedCLIP, cfg: Config, task: TaskData, device: torch.device) -> dict[str, float]:
    """Per-epoch monitor: clean accuracy and robust accuracy under ``eval.attack`` (PGD-10 by default)."""
    e = cfg.eval
    eps = eval_eps(cfg) / 255.0
    out = {"clean_acc": accuracy(model, task.test_x, task.test_y, batch_size=e.batch_size, device=device)}
    if e.attack == "none":
        out["robust_acc"] = out["clean_acc"] if eps == 0 else float("nan")
        return out
    attack = build_attack(e.attack, eps=eps, steps=e.steps, module=model)
    out["robust_acc"] = accuracy(model, task.test_x, task.test_y, attack=attack, batch_size=e.batch_size,
                                 device=device)
    return out


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, cfg: Config, model: PromptedCLIP, opt: torch.optim.Optimizer | None,
                    epoch: int, history: list[dict[str, Any]]) -> None:
    """Prompt weights + optimiser state only (small files), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": epoch, "prompts": model.prompt_state(), "config": cfg.to_dict(),
             "optimizer": opt.state_dict() if opt is not None else {}, "history": history}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, cfg: Config, model: PromptedCLIP,
                    opt: torch.optim.Optimizer | None) -> tuple[int, list[dict[str, Any]]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"checkpoint {path} cannot be read: {str(exc).splitlines()[0]}") from None
    saved_prompt = state.get("config", {}).get("prompt")
    if saved_prompt is not None and saved_prompt != cfg.to_dict()["prompt"]:
        raise ConfigError(f"checkpoint {path} was trained with prompt={saved_prompt}, "
                          f"not {cfg.to_dict()['prompt']}")
    model.load_prompt_state(state["prompts"], source=str(path))
    if opt is not None and state.get("optimizer"):
        opt.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state.get("history", []))


def load_prompts(path: str | Path) -> dict[str, Any]:
    """Read a ``prompts.pt`` written by :func:`train` (weights_only: no pickled code)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file not found: {p}")
    return torch.load(p, map_location="cpu", weights_only=True)
