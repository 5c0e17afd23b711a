"""Training: every method by configuration, gradients only to prompts, checkpoints and resume."""

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.train import OBJECTIVES, Step, build_model, lr_at, make_train_attack, train

FAST = ["prompt.depth=2", "optim.batch_size=8", "optim.warmup_epochs=0", "optim.lr=0.05",
        "eval.attack=pgd", "eval.steps=2"]


@pytest.mark.parametrize("method", ["apt", "advvlp", "advmaple", "fap", "capt"])
def test_each_method_trains(method, toy_task):
    cfg = load_config(overrides=[f"method={method}", "optim.epochs=4", *FAST])
    result = train(cfg, toy_task)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4
    assert losses[-1] < losses[0], f"{method}: loss did not fall: {losses}"
    for h in result.history:
        assert 0 <= h["robust_acc"] <= 1 and 0 <= h["clean_acc"] <= 1


@pytest.mark.parametrize("method", ["apt", "advvlp", "advmaple", "fap", "capt"])
def test_step_gradients_reach_prompts_only(method, toy_task):
    cfg = load_config(overrides=[f"method={method}", *FAST])
    model = build_model(cfg, toy_task.classnames, toy_task.templates, torch.device("cpu"))
    step = Step(model, cfg, toy_task.train_x[:8], toy_task.train_y[:8], make_train_attack(cfg, model))
    loss, _ = OBJECTIVES[cfg.loss.objective](step)
    loss.backward()
    missing = [k for k, p in model.prompts.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert all(p.grad is None for p in model.clip.parameters())


def test_capt_reports_its_terms(toy_task):
    cfg = load_config(overrides=["method=capt", "optim.epochs=1", *FAST])
    h = train(cfg, toy_task).history[0]
    assert {"loss_ce", "loss_cons_train", "loss_cons_frozen", "alpha"} <= set(h)
    assert 0 <= h["alpha"] <= 1


def test_zero_shot_trains_nothing(toy_task):
    cfg = load_config(overrides=["method=zeroshot", "eval.attack=none"])
    r = train(cfg, toy_task)
    assert r.history == [] and 0 <= r.metrics["clean_acc"] <= 1


def test_warmup_then_cosine():
    cfg = load_config(overrides=["optim.epochs=5", "optim.warmup_epochs=1", "optim.lr=0.01"])
    lrs = [lr_at(cfg, e) for e in range(5)]
    assert lrs[0] == cfg.optim.warmup_lr and lrs[1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_checkpoint_resume_matches_uninterrupted(toy_task, tmp_path):
    over = ["method=capt", *FAST]
    full = train(load_config(overrides=[*over, "optim.epochs=3"]), toy_task, out_dir=tmp_path / "a")
    with pytest.raises(_Stop):
        train(load_config(overrides=[*over, "optim.epochs=3"]), toy_task, out_dir=tmp_path / "b",
              report=_stop_after(2))
    resumed = train(load_config(overrides=[*over, "optim.epochs=3"]), toy_task, out_dir=tmp_path / "b")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-4)
    a = torch.load(tmp_path / "a" / "prompts.pt", weights_only=True)["prompts"]
    b = torch.load(tmp_path / "b" / "prompts.pt", weights_only=True)["prompts"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    size = (tmp_path / "a" / "checkpoints" / "last.pt").stat().st_size
    assert size < 200_000, "checkpoints hold prompt weights only"


def test_resume_with_other_prompt_design_is_refused(toy_task, tmp_path):
    train(load_config(overrides=["method=capt", "optim.epochs=1", *FAST]), toy_task, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="last.pt"):
        train(load_config(overrides=["method=capt", "optim.epochs=2", *FAST, "prompt.depth=3"]), toy_task,
              out_dir=tmp_path)


class _Stop(Exception):
    pass


def _stop_after(n):
    """A report callback that kills the run after epoch ``n`` (an interrupted trial)."""
    def report(metrics, ckpt):
        if metrics["epoch"] >= n:
            raise _Stop
    return report


def test_eval_eps_decides_where_robustness_is_measured(toy_task):
    """eval.eps, when set, is the eps of the per-epoch monitor and of the final figures (not the training eps)."""
    from pipeline.protocol import final_evaluation

    cfg = load_config(overrides=["method=advvlp", "optim.epochs=1", "attack.eps=8", "eval.eps=0",
                                 "eval.final_attacks=[pgd10]", *FAST])
    result = train(cfg, toy_task)
    assert result.history[0]["robust_acc"] == result.history[0]["clean_acc"]  # eps 0: no attack at all
    final = final_evaluation(cfg, result.model, toy_task, "cpu")
    assert final["pgd10_acc"] == final["clean_acc"] and "pgd10_acc_eps8" not in final
    strong = final_evaluation(cfg.replace(**{"eval.eps": 64.0}), result.model, toy_task, "cpu")
    assert strong["pgd10_acc"] < strong["clean_acc"]
