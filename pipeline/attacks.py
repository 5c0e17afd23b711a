"""l-inf attacks on raw [0, 1] pixels: PGD (CE / KL / margin losses), CW-margin PGD, AutoAttack.

One base class, :class:`Attack`, owns what every attack shares: the train/eval mode switch (restored
afterwards), input checks, and projection. Each attack writes only ``perturb``. Gradients are taken
with ``torch.autograd.grad`` with respect to the input alone, so no model or prompt parameter ever
receives an attack gradient. ``classify`` is any ``images -> logits`` callable; build it with the
tuned model's text features computed once per step (see ``train.py``) so every attack iteration
reuses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

Classifier = Callable[[torch.Tensor], torch.Tensor]


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project into the eps-ball around ``x`` and into [0, 1]."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CW margin: max_{j != y} z_j - z_y per sample (the attacker maximises it)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return other - true


@contextlib.contextmanager
def attack_mode(module: nn.Module | None) -> Iterator[None]:
    """Eval mode and no parameter gradients during an attack; modes and flags restored afterwards.

    Freezing the parameters both saves the attack the work of tracking them and guarantees that a
    library attack that calls ``backward()`` (torchattacks' FAB does) cannot touch prompt gradients.
    """
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


class Attack:
    """Base l-inf attack. ``eps`` and ``step_size`` are on the [0, 1] pixel scale."""

    name = "attack"

    def __init__(self, *, eps: float, module: nn.Module | None = None):
        if eps < 0:
            raise ValueError(f"attack eps must be >= 0, got {eps}")
        self.eps, self.module = eps, module

    def __call__(self, classify: Classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.aminmax(images.detach())
        if bool((lo < 0) | (hi > 1)):  # the call's one host-device sync (one read of one flag)
            raise ValueError("attack input must be raw pixels in [0, 1]")
        if self.eps == 0:
            return images.detach().clone()
        with attack_mode(self.module):
            x_adv = self.perturb(classify, images.detach(), labels)
        return project_linf(x_adv.detach(), images.detach(), self.eps)

    def perturb(self, classify: Classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PGD(Attack):
    """Projected gradient ascent with random start; loss ``ce``, ``kl`` (to the clean prediction) or ``margin``."""

    name = "pgd"

    def __init__(self, *, eps: float, steps: int, step_size: float, loss: str = "ce",
                 random_start: bool = True, module: nn.Module | None = None,
                 seed: int | None = None, keep_best: bool = False):
        super().__init__(eps=eps, module=module)
        if loss not in ("ce", "kl", "margin"):
            raise ValueError(f"unknown PGD loss {loss!r}")
        self.steps, self.step_size, self.loss, self.random_start = steps, step_size, loss, random_start
        # seed: a fixed random start per call (evaluation: PGD-10 and PGD-100 start from the same
        # point); keep_best: return, per sample, the first iterate that fooled the model, so more
        # steps can never give a weaker attack. Training uses the plain last iterate.
        self.seed, self.keep_best = seed, keep_best

    def _objective(self, logits: torch.Tensor, labels: torch.Tensor, clean_logp: torch.Tensor | None) -> torch.Tensor:
        logits = logits.float()
        if self.loss == "ce":
            return F.cross_entropy(logits, labels, reduction="sum")
        if self.loss == "margin":
            return margin_loss(logits, labels).sum()
        # KL(p_clean || p_adv), summed over the batch
        return F.kl_div(F.log_softmax(logits, dim=1), clean_logp, log_target=True, reduction="sum")

    def perturb(self, classify: Classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        clean_logp = None
        if self.loss == "kl":
            with torch.no_grad():
                clean_logp = F.log_softmax(classify(images).float(), dim=1)
        x_adv = images.clone()
        if self.random_start:
            # drawn on the images' device: a CPU draw copied over would cost a host-device sync and
            # seconds of CPU time per step at ViT-B/16 batch sizes (on the CPU the draws are unchanged)
            gen = torch.Generator(device=images.device).manual_seed(self.seed) if self.seed is not None else None
            noise = torch.rand(images.shape, generator=gen, device=images.device)
            x_adv = project_linf(images + (noise * 2 - 1) * self.eps, images, self.eps)
        if not self.keep_best:
            for _ in range(self.steps):
                grad, _ = self._gradient(classify, x_adv, labels, clean_logp)
                x_adv = project_linf(x_adv + self.step_size * grad.sign(), images, self.eps)
            return x_adv
        return self._perturb_keep_best(classify, images, x_adv, labels, clean_logp)

    def _gradient(self, classify: Classifier, x: torch.Tensor, labels: torch.Tensor,
                  clean_logp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss gradient with respect to ``x`` alone, and the logits at ``x`` (detached)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = classify(x)
            (grad,) = torch.autograd.grad(self._objective(logits, labels, clean_logp), x)
        return grad, logits.detach()

    def _perturb_keep_best(self, classify: Classifier, images: torch.Tensor, x_adv: torch.Tensor,
                           labels: torch.Tensor, clean_logp: torch.Tensor | None) -> torch.Tensor:
        """Evaluation PGD: per sample, the first iterate that fooled the model. A fooled sample's
        answer can no longer change, so it leaves the batch (the "active set"): later steps attack
        only the samples still classified correctly. Each sample's iterates are those of the
        full-batch loop (CLIP classifies samples independently), at a fraction of the cost once
        most samples have fallen, as they do at large eps."""
        best = images.clone()
        fooled = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        active = torch.arange(len(images), device=images.device)  # indices of samples not fooled yet
        for _ in range(self.steps):
            xa, x0 = x_adv[active], images[active]
            grad, logits = self._gradient(classify, xa, labels[active],
                                          None if clean_logp is None else clean_logp[active])
            hit = logits.argmax(dim=1) != labels[active]
            # rows still standing first, in their order, then the fooled ones: the iteration's one
            # host-device sync is the count of survivors (boolean-mask indexing would sync per mask)
            order = torch.argsort(hit.to(torch.uint8), stable=True)
            n_keep = len(hit) - int(hit.sum())
            keep, gone = order[:n_keep], order[n_keep:]
            best[active[gone]], fooled[active[gone]] = xa[gone], True
            active = active[keep]
            x_adv[active] = project_linf(xa[keep] + self.step_size * grad[keep].sign(), x0[keep], self.eps)
            if n_keep == 0:
                break
        if len(active):
            with torch.no_grad():
                hit = classify(x_adv[active]).argmax(dim=1) != labels[active]
            done = active[hit]
            best[done], fooled[done] = x_adv[done], True
        return torch.where(fooled.view(-1, 1, 1, 1), best, x_adv)


class CW(PGD):
    """Carlini-Wagner-style attack: PGD on the margin loss (as in the APT/FAP evaluations)."""

    name = "cw"

    def __init__(self, **kwargs):
        kwargs["loss"] = "margin"
        super().__init__(**kwargs)


class AutoAttack(Attack):
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) through torchattacks.

    ``classify`` must be an ``nn.Module`` here (torchattacks reads its parameters and modes):
    wrap the model with :class:`pipeline.prompts.FixedTextClassifier`.
    """

    name = "autoattack"

    def __init__(self, *, eps: float, n_classes: int, seed: int = 0, module: nn.Module | None = None):
        super().__init__(eps=eps, module=module)
        self.n_classes, self.seed = n_classes, seed

    def perturb(self, classify: Classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torchattacks  # imported here: optional heavy dependency

        if not isinstance(classify, nn.Module):
            raise TypeError("AutoAttack needs an nn.Module classifier (use FixedTextClassifier)")
        if self.n_classes < 3:
            raise ValueError("AutoAttack's targeted attacks need at least 3 classes")
        attack = torchattacks.AutoAttack(classify, norm="Linf", eps=self.eps, version="standard",
                                         n_classes=self.n_classes, seed=self.seed)
        # the reference AutoAttack (fra31/auto-attack) targets the top-9 classes in APGD-T and FAB-T;
        # torchattacks targets all n_classes - 1, which is the same for 10 classes and far slower beyond
        for sub in attack._autoattack.attacks:
            if hasattr(sub, "n_target_classes"):
                sub.n_target_classes = min(9, self.n_classes - 1)
        with torch.enable_grad():
            return attack(images, labels)


def build_attack(name: str, *, eps: float, steps: int = 10, step_size: float | None = None,
                 loss: str = "ce", n_classes: int = 0, module: nn.Module | None = None,
                 random_start: bool = True, seed: int | None = 0, keep_best: bool = True) -> Attack:
    """Attack by name (``pgd``, ``cw``, ``autoattack``); eps/step_size on the [0, 1] scale.

    Defaults suit evaluation (seeded start, best iterate kept); training passes ``seed=None,
    keep_best=False``.
    """
    step = step_size if step_size is not None else max(eps / 4, 2.5 * eps / max(steps, 1))
    kw = dict(eps=eps, steps=steps, step_size=step, random_start=random_start, module=module, seed=seed,
              keep_best=keep_best)
    if name == "pgd":
        return PGD(loss=loss, **kw)
    if name == "cw":
        return CW(**kw)
    if name == "autoattack":
        return AutoAttack(eps=eps, n_classes=n_classes, seed=seed or 0, module=module)
    raise ValueError(f"unknown attack {name!r}; choose pgd, cw or autoattack")
