"""``capt shards --demo fashion`` on a fake IDX fixture written here (no Debian package needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import data, fashion
from pipeline.cli import main
from pipeline.data.pixels import as_pixels


def _fake_idx(folder: Path, n_train: int = 40, n_test: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0] = labels * 20  # the label readable from the pixels, to check the pairing
        images[:, 1:, :] = rng.integers(0, 256, (n, 27, 28), dtype=np.uint8)
        img_name, lbl_name = fashion.FILES[split]
        fashion.write_idx(folder / img_name, images)
        fashion.write_idx(folder / lbl_name, labels)
        out[split] = (images, labels)
    return out


def test_idx_round_trip_and_bad_magic(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    fashion.write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(fashion.read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # float32 type: not ours
    with pytest.raises(ValueError, match="bad magic"):
        fashion.read_idx(tmp_path / "bad")


def test_fashion_shards_official_splits_val_and_names(tmp_path: Path) -> None:
    fake = _fake_idx(tmp_path / "idx")
    out = tmp_path / "shards"
    assert main(["shards", "--demo", "fashion", "--source", str(tmp_path / "idx"), "--out", str(out),
                 "--val-per-class", "1"]) == 0
    meta = data.ShardSource.open(out).meta
    assert meta["classes"] == list(fashion.FASHION_NAMES) and meta["templates"] == list(fashion.FASHION_TEMPLATES)
    counts = {k: v["count"] for k, v in meta["splits"].items()}
    assert counts == {"train": 30, "val": 10, "test": 20}  # val carved from the official train split only
    assert meta["official_split"] == {"train": 40, "test": 20}
    x, y, _ = data.load_split(out, "test", image_size=28)
    assert x.shape == (20, 3, 28, 28)
    assert sorted(y.tolist()) == sorted(fake["test"][1].tolist())
    pixel = (as_pixels(x[:, :, :1, :1])[:, 0, 0, 0] * 255).round().long()
    assert (pixel.to(y.dtype) == y * 20).all()  # image and label still paired
    xv, yv, _ = data.load_split(out, "val", image_size=28)
    assert sorted(yv.tolist()) == list(range(10))


def test_missing_files_one_line_error_names_package(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv(fashion.ENV_VAR, str(tmp_path / "nowhere"))
    assert main(["shards", "--demo", "fashion", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("capt: error:") and "dataset-fashion-mnist" in err and "\n" not in err
    assert not (tmp_path / "o" / "meta.json").exists()


def test_env_var_points_at_the_files(tmp_path: Path, monkeypatch) -> None:
    _fake_idx(tmp_path / "idx", n_train=20, n_test=10)
    monkeypatch.setenv(fashion.ENV_VAR, str(tmp_path / "idx"))
    meta = fashion.shards_from_fashion(tmp_path / "s", val_per_class=0, progress=False)
    assert set(meta["splits"]) == {"train", "test"} and meta["splits"]["train"]["count"] == 20


def test_tiny_clip_on_fashion_and_digits_together(tmp_path: Path, monkeypatch, capsys) -> None:
    """The stronger demo CLIP's path, at a tiny setting: two data sets, per-data-set zero-shot accuracy."""
    from pipeline import demo
    from pipeline.data.sources import shards_from_digits

    _fake_idx(tmp_path / "idx", n_train=40, n_test=20)
    monkeypatch.setenv(fashion.ENV_VAR, str(tmp_path / "idx"))
    digits = tmp_path / "cache" / "digits"
    shards_from_digits(digits, image_size=16, test_fraction=0.05, progress=False)
    monkeypatch.setattr(demo, "ensure_demo", lambda root=None, progress=True: demo.DemoAssets(
        shards=digits, checkpoint=tmp_path / "unused.pt", model_name="capt-small", zero_shot_acc=None))
    monkeypatch.setattr(demo, "BASE_MODEL", "capt-tiny")
    monkeypatch.setattr(demo, "BASE_TRAINING", {"steps": 2, "batch_size": 8, "warmup": 1})
    assets = demo.ensure_base(tmp_path / "cache", progress=False)
    assert assets.checkpoint.is_file() and assets.shards == tmp_path / "cache" / "fashion-mnist"
    acc = assets.zero_shot_acc
    assert set(acc) == {"fashion-mnist", "digits"} and all(0.0 <= v <= 1.0 for v in acc.values())
    stamp = assets.checkpoint.stat().st_mtime_ns
    assert demo.ensure_base(tmp_path / "cache", progress=False).checkpoint.stat().st_mtime_ns == stamp  # cached
    out = tmp_path / "two.pt"
    assert main(["tiny-clip", "--data", str(tmp_path / "cache" / "fashion-mnist"), str(digits), "--out", str(out),
                 "--model", "capt-tiny", "--steps", "1", "--batch-size", "4"]) == 0
    assert out.is_file() and "fashion-mnist" in capsys.readouterr().out


def test_class_captions_per_class_templates() -> None:
    import open_clip

    from pipeline.tinyclip import _class_captions

    tok = open_clip.get_tokenizer("ViT-B-32")
    tokens, counts = _class_captions(tok, ["a", "b"], [["x {}.", "y {}."], ["z {}."]])
    assert tokens.shape[:2] == (2, 2) and counts.tolist() == [2, 1]
    assert torch.equal(tokens[1, 0], tokens[1, 1])  # padded by repetition, never a foreign template
    same, counts = _class_captions(tok, ["a", "b"], ["x {}.", "y {}."])
    assert counts.tolist() == [2, 2] and not torch.equal(same[0, 0], same[0, 1])
