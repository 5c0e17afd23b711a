"""Loss functions: pure, keyword-only, unit-tested against hand-computed values.

Notation: ``kl(p=..., q=...)`` is KL(softmax(p) || softmax(q)) = sum_c P_c (log P_c - log Q_c),
averaged over the batch. Gradients flow through both arguments unless a caller detaches one.

CAPT (arXiv 2405.11154). From the paper's public summary::

    L = CE(f(x_adv), y) + lambda * L_cons
    L_cons = (1 - alpha) * L_cons_train + alpha * L_cons_frozen
    L_cons_frozen = KL(f(x_adv) || f_frozen(x_ref))

Not published, and therefore this project's documented choices (each configurable):

* ``L_cons_train = KL(f(x_adv) || f(x))``: consistency of the tuned model between its adversarial
  and clean predictions (TRADES-style; the same term as PMG-AFT's second term).
* ``x_ref`` (``loss.frozen_input``): the frozen CLIP sees the adversarial image (default, as in
  PMG-AFT) or the clean one.
* the adaptive ``alpha`` (``loss.alpha_rule``), computed per batch without gradient:
  ``fixed`` (a constant), ``ratio`` (default: alpha = L_frozen / (L_train + L_frozen), which puts
  more weight on whichever consistency is currently violated more, so neither term dominates
  — our reading of "balances the consistency on adversarial inputs against the consistency on
  clean inputs"), ``confidence`` (alpha = the frozen model's mean probability of the true class:
  lean on the frozen guide exactly as much as it is reliable on this batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def cross_entropy(*, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch."""
    return F.cross_entropy(logits.float(), labels)


def kl(*, p: torch.Tensor, q: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per sample, averaged (``mean``) or kept (``none``)."""
    logp = F.log_softmax(p.float(), dim=-1)
    logq = F.log_softmax(q.float(), dim=-1)
    per = (logp.exp() * (logp - logq)).sum(dim=-1)
    return per.mean() if reduction == "mean" else per


# ------------------------------------------------------------------ adaptive alpha rules

AlphaRule = Callable[..., torch.Tensor]
ALPHA_RULES: dict[str, AlphaRule] = {}


def _alpha_rule(name: str) -> Callable[[AlphaRule], AlphaRule]:
    def deco(fn: AlphaRule) -> AlphaRule:
        if name in ALPHA_RULES:
            raise KeyError(f"alpha rule {name!r} already registered")
        ALPHA_RULES[name] = fn
        return fn
    return deco


@_alpha_rule("fixed")
def alpha_fixed(*, alpha: float, l_train: torch.Tensor | None = None, **_: object) -> torch.Tensor:
    """A constant alpha, made on ``l_train``'s device (filled there: no host-to-device copy per step)."""
    return torch.full((), float(alpha), device=None if l_train is None else l_train.device)


@_alpha_rule("ratio")
def alpha_ratio(*, l_train: torch.Tensor, l_frozen: torch.Tensor, **_: object) -> torch.Tensor:
    """alpha = L_frozen / (L_train + L_frozen), detached; 0.5 when both are zero."""
    a, b = l_train.detach().float(), l_frozen.detach().float()
    total = a + b
    return torch.where(total > 0, b / total.clamp_min(1e-12), torch.full_like(total, 0.5))


@_alpha_rule("confidence")
def alpha_confidence(*, frozen_logits: torch.Tensor, labels: torch.Tensor, **_: object) -> torch.Tensor:
    """alpha = mean over the batch of the frozen model's probability of the true class, detached."""
    prob = F.softmax(frozen_logits.detach().float(), dim=-1)
    return prob.gather(1, labels[:, None]).mean()


def adaptive_alpha(*, rule: str, alpha: float, l_train: torch.Tensor, l_frozen: torch.Tensor,
                   frozen_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The consistency balance alpha for one batch (never carries gradient)."""
    if rule not in ALPHA_RULES:
        raise ValueError(f"unknown alpha rule {rule!r}; choose from {sorted(ALPHA_RULES)}")
    out = ALPHA_RULES[rule](alpha=alpha, l_train=l_train, l_frozen=l_frozen,
                            frozen_logits=frozen_logits, labels=labels)
    return out.to(l_train.device).detach()


# ------------------------------------------------------------------ objectives

def capt_loss(*, logits_adv: torch.Tensor, logits_clean: torch.Tensor, frozen_logits: torch.Tensor,
              labels: torch.Tensor, lam: float, alpha_rule: str = "ratio",
              alpha: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CAPT: CE(f(x_adv), y) + lam * ((1 - a) * KL(f(x_adv) || f(x)) + a * KL(f(x_adv) || f_frozen)).

    Returns the loss and its detached parts (``ce``, ``cons_train``, ``cons_frozen``, ``alpha``).
    """
    ce = cross_entropy(logits=logits_adv, labels=labels)
    l_train = kl(p=logits_adv, q=logits_clean)
    l_frozen = kl(p=logits_adv, q=frozen_logits.detach())
    a = adaptive_alpha(rule=alpha_rule, alpha=alpha, l_train=l_train, l_frozen=l_frozen,
                       frozen_logits=frozen_logits, labels=labels)
    loss = ce + lam * ((1 - a) * l_train + a * l_frozen)
    parts = {"ce": ce.detach(), "cons_train": l_train.detach(), "cons_frozen": l_frozen.detach(), "alpha": a}
    return loss, parts


def fap_loss(*, logits_clean: torch.Tensor, logits_adv: torch.Tensor, feat_clean: torch.Tensor,
             feat_adv: torch.Tensor, labels: torch.Tensor,
             weight: float = 1.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FAP: CE(f(x), y) + weight * mean_i[KL(p_clean_i || p_adv_i) * (1 + cos(f_img(x_i), f_img(x_adv_i)))]."""
    ce = cross_entropy(logits=logits_clean, labels=labels)
    per = kl(p=logits_clean, q=logits_adv, reduction="none")
    cos = F.cosine_similarity(feat_clean.float(), feat_adv.float(), dim=-1)
    cons = (per * (1 + cos)).mean()
    return ce + weight * cons, {"ce": ce.detach(), "cons": cons.detach()}


def tapt_entropy(*, logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the prediction averaged over views (marginal entropy), one value per image.

    ``logits``: (..., V, C) for V views; returns shape (...).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    avg = torch.logsumexp(logp, dim=-2) - torch.log(torch.tensor(float(logits.shape[-2])))
    return -(avg.exp() * avg).sum(dim=-1)


def tapt_alignment(*, means: list[torch.Tensor], variances: list[torch.Tensor],
                   ref_means: list[torch.Tensor], ref_vars: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of mean |mu - mu_ref| + mean |var - var_ref| (TAPT's L_align), per image.

    Each ``means[l]`` / ``variances[l]`` is (..., T, D); each reference is (T, D).
    """
    terms = []
    for mu, var, rmu, rvar in zip(means, variances, ref_means, ref_vars, strict=True):
        terms.append((mu - rmu).abs().mean(dim=(-2, -1)) + (var - rvar).abs().mean(dim=(-2, -1)))
    return torch.stack(terms).mean(dim=0)
