"""The attacks and TAPT on an accelerator: accuracy drops, eps-ball, no gradient leak, host-device syncs
in the attack loops, TAPT batched == one by one. See tests/gpu_support.py for how the device halves run.

Random weights have no accuracy to lose, so accuracy is judged on conftest's trained tiny classifier
(moved to CUDA after construction), and the model-scale checks use the model's own clean predictions.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.attacks import build_attack
from pipeline.prompts import FixedTextClassifier, PromptedCLIP
from pipeline.tapt import Tapt, TaptConfig, tune_sequential
from pipeline.tapt_stats import TaptStats, make_views, scaled_logits, token_shape, view_generators
from pipeline.train import OBJECTIVES, Step, autocast, make_train_attack

from .gpu_support import CLASSES, DEVICES, GPU, batch_on, cfg_for, count_syncs, fp32_matmuls, model_on

# ----------------------------------------------------------------------------- attacks


@pytest.fixture(scope="module")
def trained_on(trained_classifier):
    """conftest's tiny classifier with real accuracy (fine-tuned on toy colours, on the CPU), and a
    deep copy moved to CUDA AFTER construction (so every tensor the model keeps must follow .to())."""
    cache: dict[str, tuple] = {}

    def get(device: str):
        if device not in cache:
            model, x, y = trained_classifier
            moved = model if device == "cpu" else copy.deepcopy(model).to(device)
            cache[device] = (moved.eval(), x.to(device), y.to(device))
        return cache[device]
    return get


def _check_adversarial(model, adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert adv.device == x.device and adv.dtype == x.dtype and adv.shape == x.shape
    assert torch.isfinite(adv).all()
    assert float((adv - x).abs().max()) <= eps + 1e-6, "outside the eps-ball"
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1, "outside [0, 1]"
    assert all(p.grad is None for p in model.parameters()), "the attack leaked gradients"


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the best other one, per sample (negative: misclassified)."""
    return logits.gather(1, y[:, None])[:, 0] - logits.scatter(1, y[:, None], float("-inf")).amax(1)


# AutoAttack's CPU half is tests/test_attacks.py's (contract suite, strength ordering): slow on CPUs
ATTACKS_BY_DEVICE = [pytest.param("cpu", "pgd", id="cpu-pgd"), pytest.param("cpu", "cw", id="cpu-cw"),
                     *[pytest.param("cuda", w, id=f"cuda-{w}", marks=GPU) for w in ("pgd", "cw", "autoattack")]]


@pytest.mark.parametrize("device,which", ATTACKS_BY_DEVICE)
def test_attacks_reduce_accuracy(device, which, trained_on):
    """Evaluation attacks as evaluate.py builds them (fp32, seeded), eps 32/255, 16 toy images (8 for
    AutoAttack) of a model with clean accuracy 1.0. On the CPU the drop measured 1.0 -> 0.5 (PGD-10,
    CW-10) and -> 0.0 (AutoAttack); asserted: at least 0.25 lost, and AutoAttack at least as strong as PGD."""
    model, x, y = trained_on(device)
    n = 8 if which == "autoattack" else 16
    x, y = x[:n], y[:n]
    with torch.no_grad():
        clf = FixedTextClassifier(model, model.text_features())

        def acc(images: torch.Tensor) -> float:
            return float((clf(images).argmax(1) == y).float().mean())
    eps = 32 / 255
    clean = acc(x)
    assert clean >= 0.9, "a model worth attacking"
    adv = build_attack(which, eps=eps, steps=10, n_classes=len(model.classnames), module=model)(clf, x, y)
    _check_adversarial(model, adv, x, eps)
    robust = acc(adv)
    assert robust <= clean - 0.25, f"{which}: accuracy {clean:.2f} -> {robust:.2f}"
    if which == "autoattack":
        pgd = build_attack("pgd", eps=eps, steps=10, module=model)(clf, x, y)
        assert robust <= acc(pgd), "AutoAttack weaker than PGD-10"


@pytest.mark.parametrize("device,which", ATTACKS_BY_DEVICE)
def test_attacks_at_model_scale(device, which):
    """The same attacks on the step's model (ViT-B/16 on CUDA, random weights), eps 4/255, labels = the
    model's own clean predictions (random weights have no accuracy to lose): inside the ball, on the
    device, no gradient leak, and every sample's margin lowered (PGD, CW: they ascend it at every
    step; AutoAttack keeps the clean image where it fails, so there: never raised). AutoAttack runs
    on 2 images and the first 4 classes (3 target classes; its Square stage alone can spend 5,000
    forward passes on an image it has not broken)."""
    model = model_on(device, pristine=True).eval()
    n, classes = (2, 4) if which == "autoattack" else (8, len(CLASSES))
    x, _ = batch_on(model, n, device, seed=5)
    with torch.no_grad():
        clf = FixedTextClassifier(model, model.text_features()[:classes])
        y = clf(x).argmax(1)
        before = _margin(clf(x), y)
    eps = 4 / 255
    adv = build_attack(which, eps=eps, steps=10, n_classes=classes, module=model)(clf, x, y)
    _check_adversarial(model, adv, x, eps)
    with torch.no_grad():
        after = _margin(clf(adv), y)
    if which == "autoattack":
        assert (after <= before + 1e-4).all(), (before, after)
    else:
        assert (after < before).all(), (before, after)


@pytest.mark.parametrize("device", DEVICES)
def test_training_attack_loop_never_waits_for_the_host(device):
    """The training PGD (keep_best off) reads nothing back inside its loop; the whole attack call reads
    one flag (the [0, 1] range check); a whole CAPT step (forward, backward, SGD) adds nothing more.
    On CUDA ``set_sync_debug_mode('error')`` makes any synchronising call inside the loop raise."""
    cfg = cfg_for(device, "attack.steps=3")
    model = model_on(device)
    x, y = batch_on(model, 8, device, seed=6)
    attack = make_train_attack(cfg, model)
    with torch.no_grad():
        text = model.text_features()

    def classify(z):
        return model.logits(z, text)

    with count_syncs(device) as loop:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        attack.perturb(classify, x, y)
    assert loop["syncs"] == 0, loop
    with count_syncs(device) as call:
        attack(classify, x, y)
    assert call["syncs"] == 1, call  # the range check; also proves the counting sees a sync
    opt = torch.optim.SGD(list(model.prompts.parameters()), lr=1e-3, momentum=0.9)
    with count_syncs(device) as whole:
        with autocast(cfg, torch.device(device)):
            loss, _ = OBJECTIVES["capt"](Step(model, cfg, x, y, attack))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert whole["syncs"] == 1, whole


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_pgd_reads_back_once_per_iteration(device):
    """Evaluation PGD's active set (fooled samples leave the batch) needs the survivor count each
    iteration: one host read per iteration, plus the range check and the final check."""
    model = model_on(device).eval()
    x, _ = batch_on(model, 8, device, seed=7)
    with torch.no_grad():
        clf = FixedTextClassifier(model, model.text_features())
        y = clf(x).argmax(1)
    steps = 6
    attack = build_attack("pgd", eps=1 / 255, steps=steps, module=model)  # small eps: most survive
    with count_syncs(device) as seen:
        attack(clf, x, y)
    assert 1 <= seen["syncs"] <= steps + 2, seen


# ----------------------------------------------------------------------------- TAPT


def _stats(model: PromptedCLIP) -> TaptStats:
    t, d = token_shape(model)
    g = torch.Generator().manual_seed(3)
    layers = tuple(range(min(8, model.n_vision_layers)))

    def mk(var: bool) -> list[torch.Tensor]:
        return [torch.rand(t, d, generator=g) if var else torch.randn(t, d, generator=g) for _ in layers]

    return TaptStats(layers, mk(False), mk(True), mk(False), mk(True), 10)


@pytest.mark.parametrize("device", DEVICES)
def test_tapt_batched_equals_one_by_one(device):
    """TAPT tuned 4 images at once == one at a time (the official loop), fp32, on the device.

    64 views keep 6 (ViT-B/16, 4 images; capt-tiny: 8 keep 2, 3 images). Tolerances as tests/test_tapt.py: logits 1e-4,
    prompts 1e-5 absolute (one AdamW step moves a prompt by ~lr = 5e-4). An image whose
    keep-th and next views' entropies are within 1e-5 is a float tie (the two paths may keep different
    views, both right) and is left out of the exact comparison; at most one may be.
    """
    model = model_on(device).eval()
    views, tau, n = (64, 0.1, 4) if device == "cuda" else (8, 0.25, 3)
    cfg = TaptConfig(views=views, tau=tau)
    stats = _stats(model)
    x, _ = batch_on(model, n, device, seed=8)
    idx = list(range(10, 10 + n))
    with fp32_matmuls():
        batched = Tapt(model, stats, cfg)(x, idx)
        seq = tune_sequential(model, x, stats, cfg, idx)
        with torch.no_grad():
            v = make_views(x, cfg.views, view_generators(cfg.seed, idx))
            feats = model.image_features(v.flatten(0, 1)).view(len(x), cfg.views, -1)
            logits = scaled_logits(model, feats, model.text_features())
    logp = F.log_softmax(logits.float(), dim=-1)
    ent = (-(logp.exp() * logp).sum(-1)).sort(dim=-1).values
    clear = (ent[:, cfg.keep] - ent[:, cfg.keep - 1]) > 1e-5
    assert int(clear.sum()) >= len(x) - 1, ent[:, cfg.keep - 1:cfg.keep + 1]
    torch.testing.assert_close(batched.logits[clear], seq.logits[clear], rtol=0, atol=1e-4)
    assert batched.prompts.keys() == seq.prompts.keys() and batched.prompts
    for k in batched.prompts:
        torch.testing.assert_close(batched.prompts[k][clear], seq.prompts[k][clear], rtol=0, atol=1e-5)
    assert batched.logits.device.type == device
