"""The fast training path gives the results of the straightforward one.

``RefStep`` / ``REF_OBJECTIVES`` / ``ref_train_epoch`` below are the straightforward implementation
(the code before the fast path): separate image-tower passes for the clean and the adversarial
images, the frozen guide in the model's current mode, a ``.item()`` per step. The fast path
(``pipeline.train``) fuses the clean and adversarial passes into one on ``cat([x, x_adv])``, runs the
frozen guide in eval mode and keeps the epoch sums on the device. Tolerance: 1e-5, relative to the
largest entry for gradients (float32 rounding: another batch shape, another order of summing the
clean and adversarial contributions); objectives without a fused pass must match bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import pipeline.train as train_mod
from pipeline import losses
from pipeline.config import load_config
from pipeline.train import OBJECTIVES, Step, build_model, make_train_attack, train

FAST = ["prompt.depth=2", "optim.batch_size=8", "optim.warmup_epochs=0", "optim.lr=0.05", "data.augment=none",
        "eval.attack=pgd", "eval.steps=2"]
TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the reference

@dataclass
class RefStep:
    model: Any
    cfg: Any
    x: torch.Tensor
    y: torch.Tensor
    attack: Any
    text: torch.Tensor = field(init=False)
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.text = self.model.text_features()

    def _get(self, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def x_adv(self) -> torch.Tensor:
        text = self.text.detach()
        return self._get("x_adv", lambda: self.attack(lambda z: self.model.logits(z, text), self.x, self.y))

    def features(self, which: str) -> torch.Tensor:
        src = self.x if which == "clean" else self.x_adv()
        return self._get(f"feat_{which}", lambda: self.model.image_features(src))

    def logits(self, which: str) -> torch.Tensor:
        def run() -> torch.Tensor:
            out = self.model.clip.logit_scale.exp() * self.features(which) @ self.text.t()
            bias = getattr(self.model.clip, "logit_bias", None)
            return out + bias if bias is not None else out
        return self._get(f"logits_{which}", run)

    def frozen_logits(self, which: str) -> torch.Tensor:
        src = self.x if which == "clean" else self.x_adv()
        with torch.no_grad():
            return self._get(f"frozen_{which}", lambda: self.model.frozen_logits(src))


REF_OBJECTIVES = {
    "ce_clean": lambda s: (losses.cross_entropy(logits=s.logits("clean"), labels=s.y), {}),
    "ce_adv": lambda s: (losses.cross_entropy(logits=s.logits("adv"), labels=s.y), {}),
    "capt": lambda s: losses.capt_loss(
        logits_adv=s.logits("adv"), logits_clean=s.logits("clean"),
        frozen_logits=s.frozen_logits(s.cfg.loss.frozen_input), labels=s.y, lam=s.cfg.loss.lam,
        alpha_rule=s.cfg.loss.alpha_rule, alpha=s.cfg.loss.alpha),
    "fap": lambda s: losses.fap_loss(
        logits_clean=s.logits("clean"), logits_adv=s.logits("adv"), feat_clean=s.features("clean"),
        feat_adv=s.features("adv"), labels=s.y, weight=s.cfg.loss.fap_weight),
}


def ref_train_epoch(model, cfg, task, attack, objective, opt, epoch, device):
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for x, y in task.batches(cfg.optim.batch_size, epoch=epoch, seed=cfg.run.seed):
        loss, parts = REF_OBJECTIVES[cfg.loss.objective](RefStep(model, cfg, x, y, attack))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums["loss"] = sums.get("loss", 0.0) + loss.item() * len(y)
        for k, v in parts.items():
            key = f"loss_{k}" if k != "alpha" else "alpha"
            sums[key] = sums.get(key, 0.0) + float(v) * len(y)
        n += len(y)
    model.eval()
    return {k: v / max(n, 1) for k, v in sums.items()}


# ----------------------------------------------------------------------------- one step

def _one_step(make_step, objectives, cfg, model, x, y):
    torch.manual_seed(1)  # the attack's random start
    step = make_step(model, cfg, x, y, make_train_attack(cfg, model))
    loss, parts = objectives[cfg.loss.objective](step)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.prompts.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, grads, step.x_adv().detach()


def _assert_grad_close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    scale = max(1.0, float(ref.abs().max()))
    diff = float((got - ref).abs().max())
    assert diff <= tol * scale, f"gradient differs by {diff:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("method,design", [("capt", "ivlp"), ("capt", "maple"), ("fap", "fap"),
                                           ("advvlp", "ivlp")])
def test_fused_step_matches_reference(method, design, toy_task):
    """Fused (one pass on cat([x, x_adv])) and separate passes: same loss, parts and prompt gradients."""
    cfg = load_config(overrides=[f"method={method}", f"prompt.design={design}", *FAST])
    model = build_model(cfg, toy_task.classnames, toy_task.templates, torch.device("cpu"))
    model.train()
    x, y = toy_task.train_x[:8], toy_task.train_y[:8]
    ref = _one_step(RefStep, REF_OBJECTIVES, cfg, model, x, y)
    for fuse in (True, False):
        got = _one_step(lambda *a, fuse=fuse: Step(*a, fuse=fuse), OBJECTIVES, cfg, model, x, y)
        assert torch.equal(got[3], ref[3]), "the attack must see exactly the same inputs"
        torch.testing.assert_close(got[0], ref[0], **TOL)
        assert got[1].keys() == ref[1].keys()
        for k in ref[1]:
            torch.testing.assert_close(got[1][k], ref[1][k], **TOL)
        assert got[2].keys() == ref[2].keys() and ref[2]
        for k in ref[2]:
            _assert_grad_close(got[2][k], ref[2][k])
    assert model.training and model.clip.training, "the frozen pass must restore the train mode"


def test_each_pass_runs_once(toy_task, monkeypatch):
    """CAPT with fusing: one text-tower pass, one tuned image pass (2B images), one frozen pass."""
    cfg = load_config(overrides=["method=capt", *FAST])
    model = build_model(cfg, toy_task.classnames, toy_task.templates, torch.device("cpu"))
    calls: list[tuple[bool, int]] = []
    original = type(model).image_features

    def counting(self, images, *, prompted=True, capture=()):
        calls.append((prompted, len(images)))
        return original(self, images, prompted=prompted, capture=capture)

    monkeypatch.setattr(type(model), "image_features", counting)
    attack = make_train_attack(cfg, model)
    step = Step(model, cfg, toy_task.train_x[:8], toy_task.train_y[:8], attack)
    OBJECTIVES["capt"](step)
    steps = cfg.attack.steps
    assert calls == [(True, 8)] * steps + [(True, 16), (False, 8)]


# ----------------------------------------------------------------------------- whole runs

@pytest.mark.parametrize("method", ["capt", "advvlp"])
def test_two_epochs_match_reference(method, toy_task, monkeypatch):
    """Two epochs of training: the same history and prompts as the reference loop.

    advvlp (ce_adv) has no fused pass: its history must be identical, bit for bit.
    """
    cfg = load_config(overrides=[f"method={method}", "optim.epochs=2", *FAST])
    fast = train(cfg, toy_task)
    monkeypatch.setattr(train_mod, "train_epoch", ref_train_epoch)
    ref = train(cfg, toy_task)
    assert len(fast.history) == len(ref.history) == 2
    for h_fast, h_ref in zip(fast.history, ref.history, strict=True):
        assert h_fast.keys() == h_ref.keys()
        for k in h_ref:
            if k == "epoch_time_s":
                continue
            if method == "advvlp":
                assert h_fast[k] == h_ref[k], k
            else:
                assert h_fast[k] == pytest.approx(h_ref[k], rel=1e-5, abs=1e-5), k
    a, b = fast.model.prompt_state(), ref.model.prompt_state()
    for k in b:
        torch.testing.assert_close(a[k], b[k], **TOL)


def test_non_finite_loss_still_raises(toy_task, monkeypatch):
    cfg = load_config(overrides=["method=advvlp", "optim.epochs=1", *FAST])

    original = OBJECTIVES["ce_adv"]

    def broken(step):
        loss, parts = original(step)
        return loss * float("nan"), parts

    monkeypatch.setitem(OBJECTIVES, "ce_adv", broken)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 1"):
        train(cfg, toy_task)
