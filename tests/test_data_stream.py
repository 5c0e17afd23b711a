"""Streaming training and evaluation against the in-memory path, on tiny digits shards: the same
loss trajectory with shuffling off, the same accuracies, exact resume, seeded per-epoch order, the
memory budget, and the augmentation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import augment
from pipeline.data.read import LazyImages
from pipeline.data.sources import shards_from_digits
from pipeline.evaluate import final_metrics
from pipeline.task import load_task
from pipeline.train import build_model, evaluate_epoch, train

FAST = ["method=capt", "prompt.depth=2", "optim.batch_size=8", "optim.warmup_epochs=0", "optim.lr=0.05",
        "eval.attack=pgd", "eval.steps=2", "attack.steps=2", "data.shots=3", "data.test_limit=40",
        "data.workers=0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "digits"
    shards_from_digits(out, shard_size=60, progress=False)  # several shards per split
    return out


def _cfg(digits: Path, *extra: str):
    return load_config(overrides=[*FAST, f"data.path={digits}", *extra])


def _task(cfg):
    return load_task(cfg.data, 32)


@pytest.mark.parametrize("aug", ["none", "rrcrop_flip"])
def test_stream_and_memory_same_loss_trajectory(digits: Path, aug: str) -> None:
    """Shuffling off: the streamed epoch is the in-memory epoch, batch for batch (augmented alike)."""
    histories, prompts = [], []
    for mode in ("never", "always"):
        cfg = _cfg(digits, "data.shuffle=false", f"data.stream={mode}", f"data.augment={aug}", "optim.epochs=2")
        task = _task(cfg)
        assert task.streaming == (mode == "always")
        result = train(cfg, task)
        histories.append([h[k] for h in result.history for k in ("loss", "clean_acc", "robust_acc")])
        prompts.append(result.model.prompt_state())
    assert histories[0] == pytest.approx(histories[1], rel=1e-5, abs=1e-6)
    for k in prompts[0]:
        torch.testing.assert_close(prompts[0][k], prompts[1][k], rtol=1e-5, atol=1e-6)


def test_stream_and_memory_same_accuracies(digits: Path) -> None:
    cfg = _cfg(digits, "data.test_limit=null")
    memory = _task(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stream="never")))
    lazy = _task(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stream="always")))
    assert isinstance(lazy.test_x, LazyImages) and isinstance(memory.test_x, torch.Tensor)
    assert torch.equal(lazy.test_y, memory.test_y) and len(lazy.test_y) > 500
    torch.manual_seed(0)
    model = build_model(cfg, memory.classnames, memory.templates, torch.device("cpu"))
    a = evaluate_epoch(model, cfg, memory, torch.device("cpu"))
    b = evaluate_epoch(model, cfg, lazy, torch.device("cpu"))
    assert a == b
    kw = {"attacks": ["pgd10"], "eps_list": [1.0], "primary_eps": 1.0, "batch_size": 50}
    assert final_metrics(model, memory.test_x, memory.test_y, **kw) == final_metrics(model, lazy.test_x, lazy.test_y, **kw)


class _Stop(Exception):
    pass


def _stop_after(epoch: int):
    def report(metrics, _ckpt):
        if metrics["epoch"] >= epoch:
            raise _Stop
    return report


def test_streaming_resume_mid_run(digits: Path, tmp_path: Path) -> None:
    """Interrupted after epoch 1 and resumed: the same epochs (order, augmentation) as uninterrupted."""
    cfg = _cfg(digits, "data.stream=always", "optim.epochs=3")
    full = train(cfg, _task(cfg), out_dir=tmp_path / "a")
    with pytest.raises(_Stop):
        train(cfg, _task(cfg), out_dir=tmp_path / "b", report=_stop_after(1))
    resumed = train(cfg, _task(cfg), out_dir=tmp_path / "b")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)
    a = torch.load(tmp_path / "a" / "prompts.pt", weights_only=True)["prompts"]
    b = torch.load(tmp_path / "b" / "prompts.pt", weights_only=True)["prompts"]
    for k in a:  # the tolerance of the in-memory resume test (tests/test_train.py): the attack's random
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # start draws from the global RNG


def _epoch_labels(task, epoch: int, seed: int = 0) -> list[int]:
    return [int(v) for _, y in task.batches(16, epoch=epoch, seed=seed) for v in y]


def test_streamed_order_seeded_per_epoch_and_complete(digits: Path) -> None:
    cfg = _cfg(digits, "data.stream=always", "data.shots=null", "data.workers=2")
    task = _task(cfg)
    assert task.streaming and task.stats["train_in_memory"] is False
    e0, e0_again, e1 = _epoch_labels(task, 0), _epoch_labels(task, 0), _epoch_labels(task, 1)
    assert e0 == e0_again and e0 != e1  # seeded by (seed, epoch) only
    assert sorted(e0) == sorted(e1) == sorted(task.train_y.tolist())  # each sample once per epoch
    images = torch.cat([x for x, _ in task.batches(64, epoch=0, seed=0)])
    assert images.shape[0] == len(task.train_y) and images.dtype == torch.float32


def test_memory_budget_decides(digits: Path) -> None:
    small = _task(_cfg(digits, "data.memory_mb=1"))  # 30 + 40 images of 3 KB fit in 1 MB
    assert not small.streaming and isinstance(small.test_x, torch.Tensor)
    big = _task(_cfg(digits, "data.memory_mb=0"))
    assert big.streaming and isinstance(big.test_x, LazyImages)


def test_augment_modes() -> None:
    x = torch.rand(6, 3, 16, 16)
    assert augment.augment(x, "none", augment.generator(0, 0)) is x
    flipped = augment.augment(x, "flip", augment.generator(0, 0))
    assert all(torch.equal(f, s) or torch.equal(f, s.flip(-1)) for f, s in zip(flipped, x, strict=True))
    assert any(not torch.equal(f, s) for f, s in zip(flipped, x, strict=True))
    a = augment.augment(x, "rrcrop_flip", augment.generator(3, 1))
    b = augment.augment(x, "rrcrop_flip", augment.generator(3, 1))
    c = augment.augment(x, "rrcrop_flip", augment.generator(3, 2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    with pytest.raises(ValueError, match="data.augment"):
        augment.augment(x, "mixup", augment.generator(0, 0))
