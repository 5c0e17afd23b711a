"""The attack contract suite (every attack must pass it) and the strength ordering on a trained model."""

import pytest
import torch

from pipeline.attacks import build_attack
from pipeline.evaluate import final_metrics
from pipeline.prompts import FixedTextClassifier

ATTACKS = {
    "pgd-ce": dict(name="pgd", steps=5, loss="ce"),
    "pgd-kl": dict(name="pgd", steps=5, loss="kl"),
    "pgd-margin": dict(name="pgd", steps=5, loss="margin"),
    "cw": dict(name="cw", steps=5),
    "autoattack": dict(name="autoattack"),
}


def _setup(trained_classifier, n=4):
    model, x, y = trained_classifier
    with torch.no_grad():
        clf = FixedTextClassifier(model, model.text_features())
    return model, clf, x[:n], y[:n]


def _attack(spec, model, eps, n_classes=4):
    spec = dict(spec)
    return build_attack(spec.pop("name"), eps=eps, n_classes=n_classes, module=model, **spec)


@pytest.mark.parametrize("which", sorted(ATTACKS))
def test_contract(which, trained_classifier):
    model, clf, x, y = _setup(trained_classifier)
    eps = 32 / 255
    model.train()  # the attack must restore whatever mode it found
    torch.manual_seed(0)
    adv = _attack(ATTACKS[which], model, eps)(clf, x, y)
    assert model.training and all(m.training for m in model.modules())
    assert adv.shape == x.shape
    assert (adv - x).abs().max() <= eps + 1e-6, "outside the eps-ball"
    assert adv.min() >= 0 and adv.max() <= 1, "outside [0, 1]"
    params = list(model.parameters())
    assert all(p.grad is None for p in params), "an attack leaked gradients into parameters"
    model.eval()
    torch.manual_seed(0)
    again = _attack(ATTACKS[which], model, eps)(clf, x, y)
    model.train()
    torch.manual_seed(0)
    third = _attack(ATTACKS[which], model, eps)(clf, x, y)
    assert torch.equal(adv, third), "not deterministic under a fixed seed"
    assert again.shape == x.shape
    model.eval()


@pytest.mark.parametrize("which", sorted(ATTACKS))
def test_eps_zero_is_identity(which, trained_classifier):
    model, clf, x, y = _setup(trained_classifier)
    assert torch.equal(_attack(ATTACKS[which], model, 0.0)(clf, x, y), x)


@pytest.mark.parametrize("which", ["pgd-ce", "cw"])
def test_attack_actually_attacks(which, trained_classifier):
    model, clf, x, y = _setup(trained_classifier, n=16)
    adv = _attack(ATTACKS[which], model, 32 / 255)(clf, x, y)
    with torch.no_grad():
        clean_loss = torch.nn.functional.cross_entropy(clf(x), y)
        adv_loss = torch.nn.functional.cross_entropy(clf(adv), y)
    assert adv_loss > clean_loss


def test_rejects_inputs_outside_unit_range(trained_classifier):
    model, clf, x, y = _setup(trained_classifier)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _attack(ATTACKS["pgd-ce"], model, 1 / 255)(clf, x * 255, y)


def test_strength_ordering_on_trained_model(trained_classifier):
    """AutoAttack <= PGD-100 <= PGD-10 <= clean on the same model and eps."""
    model, x, y = trained_classifier
    torch.manual_seed(0)
    m = final_metrics(model, x[::4], y[::4], attacks=["pgd10", "pgd100", "autoattack"], eps_list=[16.0],
                      primary_eps=16.0)
    assert m["clean_acc"] >= 0.9, m  # a model worth attacking
    assert m["autoattack_acc"] <= m["pgd100_acc"] <= m["pgd10_acc"] <= m["clean_acc"], m
    assert m["autoattack_acc"] < m["clean_acc"], m  # the eps is large enough to matter


def _reference_keep_best(attack, clf, x, y):
    """The straightforward evaluation PGD: every sample attacked at every step, first fooling iterate kept."""
    from pipeline.attacks import project_linf

    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(attack.seed))
    x_adv = project_linf(x + (noise * 2 - 1) * attack.eps, x, attack.eps)
    best, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    for _ in range(attack.steps):
        x_adv.requires_grad_(True)
        logits = clf(x_adv)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction="sum"), x_adv)
        new = (logits.detach().argmax(1) != y) & ~fooled
        best[new], fooled = x_adv.detach()[new], fooled | new
        x_adv = project_linf(x_adv.detach() + attack.step_size * grad.sign(), x, attack.eps)
    with torch.no_grad():
        new = (clf(x_adv).argmax(1) != y) & ~fooled
    best[new], fooled = x_adv[new], fooled | new
    return torch.where(fooled.view(-1, 1, 1, 1), best, x_adv), fooled


def test_evaluation_pgd_active_set_matches_full_batch_and_saves_work(trained_classifier):
    """Fooled samples leave the batch: same adversarial images (up to float rounding across batch
    shapes) and the same verdicts as attacking every sample at every step, with fewer image passes."""
    model, clf, x, y = _setup(trained_classifier, n=32)
    attack = build_attack("pgd", eps=24 / 255, steps=20, module=model)
    seen = []

    def counting(images):
        seen.append(len(images))
        return clf(images)

    adv = attack(counting, x, y)
    with torch.enable_grad():
        ref, fooled = _reference_keep_best(attack, clf, x, y)
    with torch.no_grad():
        assert torch.equal(clf(adv).argmax(1) != y, fooled)
    assert (adv - ref).abs().max() <= 1e-5
    assert 0 < fooled.sum() < len(y), "eps should fool some samples and not others"
    assert sum(seen) < 0.9 * len(y) * (attack.steps + 1), seen


def test_autoattack_on_a_subset_reports_the_others_on_the_same_images(trained_classifier):
    model, x, y = trained_classifier
    x, y = x[1::2], y[1::2]  # 16 images (AutoAttack costs seconds per image still standing on a CPU)
    # the whole-set figures without AutoAttack (they must not depend on it; PGD seeds its own noise)
    full = final_metrics(model, x, y, attacks=["pgd10"], eps_list=[16.0], primary_eps=16.0)
    torch.manual_seed(0)
    sub = final_metrics(model, x, y, attacks=["pgd10", "autoattack"], eps_list=[16.0], primary_eps=16.0,
                        autoattack_limit=10)
    assert sub["autoattack_n"] == 10 and "autoattack_n" not in full
    whole = final_metrics(model, x[:2], y[:2], attacks=["autoattack"], eps_list=[16.0], primary_eps=16.0)
    assert "autoattack_n" not in whole and "clean-aasub_acc" not in whole  # no limit: no subset figures
    assert sub["clean_acc"] == full["clean_acc"] and sub["pgd10_acc"] == full["pgd10_acc"]  # whole set
    head = final_metrics(model, x[:10], y[:10], attacks=["pgd10"], eps_list=[16.0], primary_eps=16.0)
    assert sub["clean-aasub_acc"] == head["clean_acc"] and sub["pgd10-aasub_acc"] == head["pgd10_acc"]
    assert sub["autoattack_acc"] <= sub["pgd10-aasub_acc"] <= sub["clean-aasub_acc"]
