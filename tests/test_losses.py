"""Loss functions against hand-computed values."""

import math

import pytest
import torch

from pipeline import losses


def test_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    expected = (-math.log(math.e**2 / (math.e**2 + 1)) + math.log(2)) / 2
    assert losses.cross_entropy(logits=logits, labels=labels).item() == pytest.approx(expected, rel=1e-6)


def test_kl_by_hand_and_direction():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(P || Q)
    assert losses.kl(p=p, q=q).item() == pytest.approx(expected, rel=1e-6)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert losses.kl(p=q, q=p).item() == pytest.approx(reverse, rel=1e-6)
    assert losses.kl(p=p, q=p).item() == pytest.approx(0.0, abs=1e-7)


def test_alpha_rules_by_hand():
    lt, lf = torch.tensor(1.0), torch.tensor(3.0)
    frozen = torch.log(torch.tensor([[0.8, 0.2], [0.4, 0.6]]))
    y = torch.tensor([0, 0])
    kw = dict(l_train=lt, l_frozen=lf, frozen_logits=frozen, labels=y)
    assert losses.adaptive_alpha(rule="fixed", alpha=0.3, **kw).item() == pytest.approx(0.3)
    assert losses.adaptive_alpha(rule="ratio", alpha=0.3, **kw).item() == pytest.approx(0.75)
    assert losses.adaptive_alpha(rule="confidence", alpha=0.3, **kw).item() == pytest.approx(0.6)
    zero = dict(kw, l_train=torch.tensor(0.0), l_frozen=torch.tensor(0.0))
    assert losses.adaptive_alpha(rule="ratio", alpha=0.3, **zero).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown alpha rule"):
        losses.adaptive_alpha(rule="nope", alpha=0.3, **kw)


def test_alpha_carries_no_gradient():
    lt = torch.tensor(1.0, requires_grad=True)
    lf = torch.tensor(2.0, requires_grad=True)
    a = losses.adaptive_alpha(rule="ratio", alpha=0.5, l_train=lt, l_frozen=lf,
                              frozen_logits=torch.zeros(1, 2), labels=torch.tensor([0]))
    assert not a.requires_grad


def test_capt_loss_by_hand():
    adv = torch.log(torch.tensor([[0.6, 0.4]]))
    clean = torch.log(torch.tensor([[0.9, 0.1]]))
    frozen = torch.log(torch.tensor([[0.5, 0.5]]))
    y = torch.tensor([0])
    ce = -math.log(0.6)
    l_train = 0.6 * math.log(0.6 / 0.9) + 0.4 * math.log(0.4 / 0.1)
    l_frozen = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    loss, parts = losses.capt_loss(logits_adv=adv, logits_clean=clean, frozen_logits=frozen, labels=y,
                                   lam=2.0, alpha_rule="fixed", alpha=0.25)
    assert loss.item() == pytest.approx(ce + 2.0 * (0.75 * l_train + 0.25 * l_frozen), rel=1e-5)
    assert parts["cons_train"].item() == pytest.approx(l_train, rel=1e-5)
    assert parts["cons_frozen"].item() == pytest.approx(l_frozen, rel=1e-5)
    loss_r, parts_r = losses.capt_loss(logits_adv=adv, logits_clean=clean, frozen_logits=frozen, labels=y,
                                       lam=1.0, alpha_rule="ratio")
    a = l_frozen / (l_train + l_frozen)
    assert parts_r["alpha"].item() == pytest.approx(a, rel=1e-5)
    assert loss_r.item() == pytest.approx(ce + (1 - a) * l_train + a * l_frozen, rel=1e-5)


def test_capt_lambda_zero_is_adversarial_ce():
    adv, clean, frozen = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    loss, _ = losses.capt_loss(logits_adv=adv, logits_clean=clean, frozen_logits=frozen, labels=y, lam=0.0)
    assert loss.item() == pytest.approx(losses.cross_entropy(logits=adv, labels=y).item(), rel=1e-6)


def test_fap_loss_by_hand():
    clean = torch.log(torch.tensor([[0.7, 0.3], [0.5, 0.5]]))
    adv = torch.log(torch.tensor([[0.4, 0.6], [0.5, 0.5]]))
    f_clean = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f_adv = torch.tensor([[0.0, 1.0], [0.0, 2.0]])  # cos = 0 and 1
    y = torch.tensor([0, 1])
    ce = (-math.log(0.7) - math.log(0.5)) / 2
    kl0 = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    cons = (kl0 * (1 + 0) + 0.0 * (1 + 1)) / 2
    loss, parts = losses.fap_loss(logits_clean=clean, logits_adv=adv, feat_clean=f_clean, feat_adv=f_adv,
                                  labels=y, weight=1.5)
    assert loss.item() == pytest.approx(ce + 1.5 * cons, rel=1e-5)
    assert parts["cons"].item() == pytest.approx(cons, rel=1e-5)


def test_tapt_entropy_and_alignment_by_hand():
    # two views: p = (1, 0) and (0, 1) -> average (0.5, 0.5) -> entropy log 2
    logits = torch.tensor([[[20.0, -20.0], [-20.0, 20.0]]])
    assert losses.tapt_entropy(logits=logits).item() == pytest.approx(math.log(2), rel=1e-4)
    mu = [torch.ones(2, 3), torch.zeros(2, 3)]
    var = [torch.zeros(2, 3), torch.ones(2, 3)]
    ref_mu = [torch.zeros(2, 3), torch.zeros(2, 3)]
    ref_var = [torch.zeros(2, 3), torch.full((2, 3), 3.0)]
    # layer 0: |1-0| + |0-0| = 1; layer 1: 0 + |1-3| = 2 -> mean 1.5
    assert losses.tapt_alignment(means=mu, variances=var, ref_means=ref_mu, ref_vars=ref_var).item() == 1.5
