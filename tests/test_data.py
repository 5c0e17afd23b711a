"""Shards writing and reading: round trips on real tar files written into tmp_path."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline import data
from pipeline.data import (
    ShardSource,
    base_new_split,
    few_shot_indices,
    load_split,
    make_dataset,
    pixels,
    shard_urls,
)
from pipeline.data import write as shards
from pipeline.data.meta import read_meta
from pipeline.data.sources import shards_from_digits, shards_from_folder
from pipeline.data.write import write_dataset

NUM_CLASSES = 4


def _pixel_samples(n: int, num_classes: int = NUM_CLASSES):
    """4x4 RGB images whose pixels hold the sample index; label = index % num_classes."""
    for i in range(n):
        yield np.full((4, 4, 3), i, dtype=np.uint8), i % num_classes, None


def _write(out: Path, n: int = 40, shard_size: int = 7, num_classes: int = NUM_CLASSES, **kw) -> dict:
    names = [f"class {c}" for c in range(num_classes)]
    return write_dataset(out, name="tiny", classes=names, splits={"train": _pixel_samples(n, num_classes)},
                         shard_size=shard_size, progress=False, **kw)


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    _write(tmp_path / "tiny")
    return tmp_path / "tiny"


def _keys(dataset, num_workers: int = 0) -> list[str]:
    if num_workers == 0:
        return [key for _, _, key in dataset]
    loader = DataLoader(dataset, batch_size=3, num_workers=num_workers)
    return [key for _, _, keys in loader for key in keys]


ALL_KEYS = sorted(f"train_{i:06d}" for i in range(40))


def test_round_trip(tiny: Path) -> None:
    images, labels, stats = load_split(tiny, "train", image_size=4)
    assert images.shape == (40, 3, 4, 4) and images.dtype == torch.uint8  # a quarter of float32's memory
    assert labels.dtype == torch.int64 and labels.tolist() == [i % NUM_CLASSES for i in range(40)]
    expected = torch.arange(40, dtype=torch.float32).div(255).view(40, 1, 1, 1).expand_as(images)
    assert torch.equal(pixels.as_pixels(images), expected)  # lossless PNG, no resize at the stored size
    assert stats == {"samples": 40, "skipped_shards": 0, "skipped_samples": 0}
    big, _, _ = load_split(tiny, "train", image_size=9)
    assert big.shape == (40, 3, 9, 9)
    streamed = torch.stack([x for x, _ in make_dataset(tiny, split="train", image_size=9)])  # float path
    assert streamed.dtype == torch.float32 and torch.equal(pixels.as_pixels(big), streamed)


def test_meta_contents(tiny: Path) -> None:
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["format"] == "capt-shards/1" and meta["name"] == "tiny" and meta["image_format"] == "png"
    assert meta["classes"] == [f"class {c}" for c in range(NUM_CLASSES)]
    assert meta["templates"] == list(shards.DEFAULT_TEMPLATES)
    train = meta["splits"]["train"]
    assert train["count"] == 40 and train["shard_counts"] == [7, 7, 7, 7, 7, 5]
    assert train["shards"] == [f"train-{i:06d}.tar" for i in range(6)]
    assert train["pattern"] == "train-{000000..000005}.tar"
    assert all((tiny / name).is_file() for name in train["shards"])
    assert not list(tiny.glob(".*tmp*"))
    with tarfile.open(tiny / "train-000000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["train_000000.cls", "train_000000.png", "train_000000.txt"]
        assert tar.extractfile("train_000001.txt").read().decode() == "a photo of a class 1."
    assert data.class_names(tiny, [2, 0]) == ["class 2", "class 0"]
    assert data.templates(tiny) == list(shards.DEFAULT_TEMPLATES)


def test_refuse_overwrite_keeps_files(tiny: Path) -> None:
    before = {p.name: p.read_bytes() for p in tiny.iterdir()}
    with pytest.raises(ValueError, match=str(tiny)) as info:
        _write(tiny, n=10)
    assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in tiny.iterdir()} == before
    _write(tiny, n=10, overwrite=True)
    assert read_meta(tiny)["splits"]["train"]["count"] == 10
    assert sorted(p.name for p in tiny.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]


def test_read_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta.json"):
        read_meta(tmp_path)  # an incomplete folder: shards without meta
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="meta.json.*other/9"):
        read_meta(tmp_path)


def _image_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "sea_lion", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            size = (6 + i, 9 - i)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    (root / "dog" / "notes.txt").write_text("ignored")


def test_shards_from_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _image_tree(tmp_path / "src")
    with caplog.at_level(logging.WARNING):
        meta = shards_from_folder(tmp_path / "src", tmp_path / "out", test_fraction=0.2, progress=False)
    assert meta["classes"] == ["cat", "dog", "sea lion"] and meta["skipped_files"] == 1
    assert "broken.png" in caplog.text
    assert meta["splits"]["train"]["count"] == 12 and meta["splits"]["test"]["count"] == 3
    _, test_labels, _ = load_split(tmp_path / "out", "test", image_size=8)
    assert sorted(test_labels.tolist()) == [0, 1, 2]  # stratified: one per class
    again = shards_from_folder(tmp_path / "src", tmp_path / "again", test_fraction=0.2, progress=False)
    assert again["splits"] == meta["splits"]
    first = (tmp_path / "out" / "test-000000.tar").read_bytes()
    assert (tmp_path / "again" / "test-000000.tar").read_bytes() == first  # deterministic shards
    with pytest.raises(ValueError, match="missing"):
        shards_from_folder(tmp_path / "missing", tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        shards_from_folder(tmp_path / "empty", tmp_path / "o3")


def test_digits_demo(tmp_path: Path) -> None:
    meta = shards_from_digits(tmp_path / "digits", image_size=16, progress=False)
    splits = meta["splits"]
    assert splits["train"]["count"] + splits["test"]["count"] == 1797
    assert meta["classes"][:3] == ["zero", "one", "two"] and "{}" in meta["templates"][0]
    images, labels, stats = load_split(tmp_path / "digits", "test", image_size=16)
    assert images.shape == (splits["test"]["count"], 3, 16, 16) and stats["skipped_shards"] == 0
    assert set(labels.tolist()) == set(range(10)) and images.max() > 230


@pytest.mark.parametrize("num_workers", [1, 2])
def test_worker_split_sees_each_sample_once(tiny: Path, num_workers: int) -> None:
    dataset = make_dataset(tiny, split="train", image_size=4, with_keys=True, shuffle_buffer=5)
    keys = _keys(dataset, num_workers)
    assert sorted(keys) == ALL_KEYS


@pytest.mark.parametrize(("shards_count", "world", "num_workers"),
                         [(6, 2, 0), (6, 2, 2), (3, 2, 2), (1, 1, 2), (1, 3, 0)])
def test_node_split_partitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               shards_count: int, world: int, num_workers: int) -> None:
    _write(tmp_path / "s", n=40, shard_size=-(-40 // shards_count))
    assert len(shard_urls(tmp_path / "s", "train")) == shards_count
    per_rank = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        dataset = make_dataset(tmp_path / "s", split="train", image_size=4, with_keys=True,
                               shuffle_buffer=4, seed=3)
        per_rank.append(_keys(dataset, num_workers))
    union = [key for keys in per_rank for key in keys]
    assert sorted(union) == ALL_KEYS  # nothing lost, nothing duplicated
    assert all(keys for keys in per_rank)  # no idle rank, even with fewer shards than readers


def test_loader_reshuffles_each_epoch(tiny: Path) -> None:
    loader = data.make_loader(tiny, "train", image_size=4, batch_size=8, shuffle=True, seed=1)
    first = torch.cat([labels for _, labels in loader])
    images, second = zip(*[(x, y) for x, y in loader], strict=True)
    second = torch.cat(second)
    assert images[0].shape == (8, 3, 4, 4)
    assert sorted(first.tolist()) == sorted(second.tolist()) and len(first) == 40
    order = [key for _, _, key in make_dataset(tiny, split="train", image_size=4, with_keys=True)]
    assert order == ALL_KEYS  # no shuffle by default


def test_few_shot_indices() -> None:
    labels = [i % 5 for i in range(100)]
    picked = few_shot_indices(labels, 4, seed=0)
    assert picked == few_shot_indices(labels, 4, seed=0) == sorted(picked)
    assert picked != few_shot_indices(labels, 4, seed=1)
    assert np.bincount([labels[i] for i in picked]).tolist() == [4] * 5
    assert few_shot_indices(labels, None, seed=0) == list(range(100))
    with pytest.raises(ValueError):
        few_shot_indices(labels, 0, seed=0)


def test_few_shot_too_few_takes_all(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        picked = few_shot_indices([0, 0, 0, 1], 2, seed=0)
    assert len(picked) == 3 and 3 in picked and "fewer than 2" in caplog.text


def test_load_split_few_shot_and_classes(tiny: Path) -> None:
    images, labels, _ = load_split(tiny, "train", image_size=4, classes=[3, 1], shots=2, seed=5)
    assert labels.tolist().count(0) == 2 and labels.tolist().count(1) == 2 and len(labels) == 4
    original = images[:, 0, 0, 0].long() % NUM_CLASSES  # pixel value (uint8) = index
    assert [{0: 3, 1: 1}[int(y)] for y in labels] == original.tolist()  # remapped in the given order
    again, _, _ = load_split(tiny, "train", image_size=4, classes=[3, 1], shots=2, seed=5)
    assert torch.equal(images, again)


def test_base_new_split() -> None:
    assert base_new_split(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert base_new_split(5) == ([0, 1, 2], [3, 4])
    with pytest.raises(ValueError):
        base_new_split(1)


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2 + 100)


def test_corrupt_shard_skipped_or_refused(tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    _truncate(tiny / "train-000002.tar")
    with caplog.at_level(logging.WARNING):
        _, labels, stats = load_split(tiny, "train", image_size=4)
    assert stats["skipped_shards"] == 1 and 0 < stats["skipped_samples"] < 7
    assert stats["samples"] + stats["skipped_samples"] == 40 == len(labels) + stats["skipped_samples"]
    assert "train-000002.tar" in caplog.text
    with pytest.raises(ValueError, match="train-000002.tar") as info:
        load_split(tiny, "train", image_size=4, strict=True)
    assert "\n" not in str(info.value)


def test_shard_shorter_than_meta_is_detected(tiny: Path) -> None:
    path = tiny / "train-000001.tar"
    with tarfile.open(path) as tar:  # a cut exactly at a member boundary reads as a clean tar
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()[:9]]
    with tarfile.open(path, "w") as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
    _, _, stats = load_split(tiny, "train", image_size=4)
    assert stats == {"samples": 36, "skipped_shards": 1, "skipped_samples": 4}  # 3 of 7 kept


def test_corrupt_sample(tmp_path: Path) -> None:
    samples = [(np.zeros((4, 4, 3), np.uint8), 0, None), (np.ones((4, 4, 3), np.uint8), 1, None)]
    shards.write_split(samples, tmp_path, "train", progress=False)
    path = tmp_path / "train-000000.tar"
    raw = path.read_bytes()
    png = shards.encode_image(samples[1][0])
    path.write_bytes(raw.replace(png, b"\0" * len(png)))  # same size: the tar stays readable
    dataset = make_dataset(str(path), image_size=4, num_classes=2)
    assert len(list(dataset)) == 1 and dataset.stats["skipped_samples"] == 1
    with pytest.raises(ValueError, match="train_000001"):
        list(make_dataset(str(path), image_size=4, strict=True))


def test_label_out_of_range_names_shard_and_key(tiny: Path) -> None:
    meta = read_meta(tiny)
    meta["classes"] = meta["classes"][:3]  # label 3 is now out of range
    (tiny / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"train-000000\.tar.*train_000003"):
        load_split(tiny, "train", image_size=4)


def test_urls_and_remote_roots(tiny: Path) -> None:
    pattern = str(tiny / "train-{000000..000005}.tar")
    dataset = make_dataset(pattern, image_size=4, with_keys=True)
    assert sorted(_keys(dataset)) == ALL_KEYS
    meta = read_meta(tiny)
    http = ShardSource.open("https://host/data/tiny/", meta=meta)
    assert shard_urls(http, "train")[0] == "https://host/data/tiny/train-000000.tar"
    s3 = ShardSource.open("s3://bucket/tiny", meta=meta)
    assert shard_urls(s3, "train")[-1] == "pipe:aws s3 cp s3://bucket/tiny/train-000005.tar -"
    piped = make_dataset("pipe:cat " + pattern, image_size=4, with_keys=True)
    assert len(piped.urls) == 6 and sorted(_keys(piped)) == ALL_KEYS
    with pytest.raises(ValueError, match="no split 'val'"):
        shard_urls(tiny, "val")


def test_transform_matches_torchvision() -> None:
    tv = pytest.importorskip("torchvision.transforms.functional")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 23, 3), dtype=np.uint8))
    ours = pixels.to_tensor(image, 16)
    resized = tv.resize(image, 16, interpolation=tv.InterpolationMode.BICUBIC)
    theirs = tv.to_tensor(tv.center_crop(resized, 16))
    assert ours.shape == (3, 16, 16) and torch.allclose(ours, theirs)
