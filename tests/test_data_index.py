"""The per-split index on tiny real shards: round trip, selection identical to the label pre-pass,
stale indexes refused, existing tars adopted byte for byte, per-split folders, bad input, and a
search's data setup opening the source shards once per search (not once per trial)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import index, stream, tario
from pipeline.data.adopt import adopt
from pipeline.data.select import select
from pipeline.data.sources import shards_from_split_folders
from pipeline.data.write import write_dataset
from pipeline.task import load_task

NUM_CLASSES = 5


def _samples(n: int, num_classes: int = NUM_CLASSES, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), int(rng.integers(num_classes)), None


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    out = tmp_path / "tiny"
    write_dataset(out, name="tiny", classes=[f"c{i}" for i in range(NUM_CLASSES)],
                  splits={"train": _samples(60), "test": _samples(30, seed=1)}, shard_size=9, progress=False)
    return out


def test_index_round_trip(tiny: Path) -> None:
    meta = stream.ShardSource.open(tiny).meta
    idx = index.load(tiny, "train", meta["splits"]["train"]["shards"], num_classes=NUM_CLASSES, build_missing=False)
    streamed = list(stream.make_dataset(tiny, split="train", image_size=6, with_keys=True, uint8=True))
    assert idx.key == [k for _, _, k in streamed] and idx.label.tolist() == [int(y) for _, y, _ in streamed]
    assert [s["count"] for s in idx.shards] == meta["splits"]["train"]["shard_counts"]
    for r in (0, 13, 59):  # the image bytes at the recorded offsets are the tar member's bytes
        with tarfile.open(idx.paths[idx.shard[r]]) as tar:
            member = tar.extractfile(f"{idx.key[r]}.png").read()
        with open(idx.paths[idx.shard[r]], "rb") as handle:
            assert tario.read_member(handle, int(idx.offset[r]), int(idx.length[r])) == member
    again = index._from_json(str(tiny), json.loads(index.index_path(tiny, "train").read_text()), Path("x"))
    assert again.key == idx.key and np.array_equal(again.offset, idx.offset)


@pytest.mark.parametrize(("classes", "shots", "seed"), [(None, 3, 0), ([3, 1], 2, 7), ([0, 2, 4], None, 1),
                                                         (None, 100, 2)])
def test_selection_matches_the_label_prepass(tiny: Path, classes, shots, seed) -> None:
    """Selection through the index returns exactly the samples (and order) of today's pre-pass."""
    ds = stream.make_dataset(tiny, split="train", image_size=6, classes=classes, shots=shots, seed=seed,
                             with_keys=True, uint8=True, shard_shuffle=False)
    old = [(k, int(y)) for _, y, k in ds]
    idx = index.load(tiny, "train", stream.ShardSource.open(tiny).split("train")["shards"], num_classes=NUM_CLASSES)
    sel = select(idx, num_classes=NUM_CLASSES, classes=classes, shots=shots, seed=seed)
    assert [(idx.key[r], int(y)) for r, y in zip(sel.rows, sel.labels, strict=True)] == old


def test_load_task_matches_the_old_path(tiny: Path, tmp_path: Path) -> None:
    cfg = DataConfig(path=str(tiny), shots=2, classes="new", test_limit=7, seed=4)
    src, subset = stream.ShardSource.open(tiny), [3, 4]
    x, y, _ = stream.load_split(src, "train", image_size=8, classes=subset, shots=2, seed=4)
    xt, yt, _ = stream.load_split(src, "test", image_size=8, classes=subset, seed=4)
    keep = torch.randperm(len(yt), generator=torch.Generator().manual_seed(4))[:7].sort().values
    for cache in ("", str(tmp_path / "cache")):
        task = load_task(DataConfig(**{**cfg.__dict__, "cache": cache}), 8)
        assert torch.equal(task.train_x, x) and torch.equal(task.train_y, y)
        assert torch.equal(task.test_x, xt[keep]) and torch.equal(task.test_y, yt[keep])
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train subset + capped test subset


def _rename_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite one member header (name ``old`` -> ``new``, checksum fixed): same size, other members."""
    raw = bytearray(path.read_bytes())
    at = raw.index(old)
    header = at - at % 512
    raw[at:at + len(new)] = new
    raw[header + 148:header + 156] = b" " * 8
    raw[header + 148:header + 156] = b"%06o\0 " % sum(raw[header:header + 512])
    path.write_bytes(bytes(raw))


def test_stale_index_refused(tiny: Path) -> None:
    shard = tiny / "train-000001.tar"
    names = stream.ShardSource.open(tiny).split("train")["shards"]
    before = index.index_path(tiny, "train").read_bytes()
    os.utime(shard, ns=(1, 1))  # touched only (a copy): headers re-checked, accepted
    index.load(tiny, "train", names, num_classes=NUM_CLASSES)
    size = shard.stat().st_size
    _rename_in_place(shard, b"train_000010.png", b"train_000010.jpg")  # rewritten, same size
    assert shard.stat().st_size == size and tarfile.open(shard).getnames()[4] == "train_000010.jpg"
    with pytest.raises(ValueError, match=r"train-000001\.tar: its members moved.*stale") as info:
        load_task(DataConfig(path=str(tiny), shots=1), 6)
    assert "\n" not in str(info.value)
    with open(shard, "r+b") as handle:
        handle.truncate(size - 1024)
    with pytest.raises(ValueError, match=r"train-000001\.tar: \d+ bytes, indexed at \d+ \(rewritten or truncated"):
        load_task(DataConfig(path=str(tiny), shots=1), 6)
    assert index.index_path(tiny, "train").read_bytes() == before  # nothing already written is changed


def _wds_tars(root: Path, label_in: str = "cls", n: int = 12, per: int = 5, prefix: str = "imagenet-train") -> None:
    """Tars as img2dataset / the ImageNet WebDataset layout write them: jpg + cls (or json)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(0, n, per):
        with tarfile.open(root / f"{prefix}-{s // per:06d}.tar", "w") as tar:
            for i in range(s, min(s + per, n)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(buf, format="JPEG")
                label = str(i % 3).encode() if label_in == "cls" else json.dumps({"label": i % 3, "w": 12}).encode()
                for ext, payload in (("jpg", buf.getvalue()), (label_in, label)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("label_in", ["cls", "json"])
def test_adopt_leaves_tars_byte_identical(tmp_path: Path, label_in: str) -> None:
    root = tmp_path / "wds"
    _wds_tars(root, label_in)
    _wds_tars(root, label_in, n=6, prefix="imagenet-val")
    (tmp_path / "classes.txt").write_text("tench\ngoldfish\nshark\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.glob("*.tar")}
    meta = adopt(root, classes_file=tmp_path / "classes.txt",
                 splits={"train": "imagenet-train-*.tar", "test": "imagenet-val-*.tar"})
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.glob("*.tar")} == before
    assert meta["splits"]["train"]["count"] == 12 and meta["splits"]["test"]["count"] == 6
    assert meta["image_format"] == "jpg" and meta["classes"] == ["tench", "goldfish", "shark"]
    task = load_task(DataConfig(path=str(root), shots=2, augment="none"), 8)
    assert sorted(task.train_y.tolist()) == [0, 0, 1, 1, 2, 2] and task.test_x.shape == (6, 3, 8, 8)


def test_adopt_bad_input(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    _wds_tars(root)
    (tmp_path / "two.txt").write_text("a\nb\n")
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(ValueError, match=r"imagenet-train-000000\.tar: sample 00000002: label 2 outside"):
        adopt(root, classes_file=tmp_path / "two.txt", splits={"train": "*.tar"})
    with pytest.raises(ValueError, match=r"four\.txt: 4 class names, but the labels go up to 2"):
        adopt(root, classes_file=tmp_path / "four.txt", splits={"train": "*.tar"})
    with tarfile.open(root / "imagenet-train-000009.tar", "w") as tar:  # a sample without a label
        info = tarfile.TarInfo("nolabel.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match=r"imagenet-train-000009\.tar: sample nolabel has no label"):
        adopt(root, classes_file=tmp_path / "four.txt", splits={"train": "*.tar"})
    assert not (root / "meta.json").exists() and not list(root.glob("*.index.json"))  # nothing written


def test_per_split_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for name in (("cat", "dog") if split == "train" else ("dog", "cat")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).save(tmp_path / split / name / f"{i}.png")
    meta = shards_from_split_folders({"train": tmp_path / "train", "test": tmp_path / "val"}, tmp_path / "out",
                                     progress=False)
    assert meta["classes"] == ["cat", "dog"] and meta["splits"]["test"]["count"] == 4
    task = load_task(DataConfig(path=str(tmp_path / "out"), shots=None, augment="none"), 5)
    assert sorted(task.test_y.tolist()) == [0, 0, 1, 1] and sorted(task.train_y.tolist()) == [0, 0, 0, 1, 1, 1]
    (tmp_path / "val" / "bird").mkdir()
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "val" / "bird" / "0.png")
    with pytest.raises(ValueError, match=r"val: class folder\(s\) \['bird'\] not among the 2 classes"):
        shards_from_split_folders({"train": tmp_path / "train", "test": tmp_path / "val"}, tmp_path / "o2",
                                  progress=False)


@pytest.fixture()
def count_opens(monkeypatch):
    """Every open of a shard file, by path: by offset (tario) and by the streaming reader (gopen)."""
    opened: Counter = Counter()
    real_open, real_tar = tario.open_shard, stream._tar_samples

    def counted_open(path):
        opened[os.path.realpath(path)] += 1
        return real_open(path)

    def counted_tar(url):
        opened[os.path.realpath(url)] += 1
        return real_tar(url)

    monkeypatch.setattr(tario, "open_shard", counted_open)
    monkeypatch.setattr(stream, "_tar_samples", counted_tar)
    return opened


def test_search_opens_source_shards_once(tmp_path: Path, count_opens) -> None:
    """The search driver's data preparation, then the data setup of three trials (what trial_main
    runs): each source shard is read at most once in all; the trials read only the subsets. Before
    subsets, each trial read every source shard twice (label pre-pass, then the chosen samples)."""
    from pipeline.data.sources import shards_from_digits
    from pipeline.search_report import prepare
    from pipeline.search_space import load_search

    digits = tmp_path / "digits"
    shards_from_digits(digits, shard_size=100, progress=False)
    source_shards = {os.path.realpath(p) for p in digits.glob("*.tar")}
    spec = load_search(Path(__file__).resolve().parent.parent / "search_spaces" / "smoke.yaml",
                       [f"search.out={tmp_path / 'out'}", f"base.data.path={digits}", "base.data.test_limit=100"])
    count_opens.clear()
    plan = prepare(spec)
    at_prepare = Counter({p: n for p, n in count_opens.items() if p in source_shards})
    assert at_prepare and max(at_prepare.values()) == 1
    from pipeline.config import from_dict

    for params in ({"loss.lam": 1.0}, {"loss.lam": 2.0}, {"attack.eps": 2.0}):  # three trials
        cfg = from_dict(plan.base).replace(**params)
        task = load_task(cfg.data, plan.image_size)
        assert len(task.train_y) == 20 and len(task.test_y) == 100
    in_trials = {p: n for p, n in count_opens.items() if p in source_shards and n > at_prepare.get(p, 0)}
    assert in_trials == {}, f"trials opened source shards: {in_trials}"
    assert str(Path(plan.storage_path) / "data_subsets") == from_dict(plan.base).data.cache
    before = sum(count_opens[p] for p in source_shards)
    spec2 = load_search(Path(__file__).resolve().parent.parent / "search_spaces" / "smoke.yaml",
                        [f"search.out={tmp_path / 'out'}", f"base.data.path={digits}", "base.data.test_limit=100",
                         "search.name=another"])
    assert prepare(spec2).base == {**plan.base}  # another search (or --resume) on the same storage
    assert sum(count_opens[p] for p in source_shards) == before  # reuses the subsets: no source read


def test_cli_adopt_and_stale_index_are_one_line_errors(tmp_path: Path, tiny: Path, capsys) -> None:
    from pipeline.cli import main

    root = tmp_path / "wds"
    _wds_tars(root)
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert main(["shards", "--adopt", str(root), "--classes", str(tmp_path / "four.txt"), "--split", "train=*.tar"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("capt: error: ") and "four.txt" in err and "\n" not in err
    assert main(["shards", "--adopt", str(root), "--classes", str(tmp_path / "three.txt"), "--split", "train=*.tar"]) == 0
    assert "indexed 12 samples (train_samples 12), 3 classes" in capsys.readouterr().out
    shard = tiny / "test-000000.tar"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 512)
    config = Path(__file__).resolve().parent.parent / "configs" / "capt.yaml"
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--set", f"data.path={tiny}",
                 "--set", "model.name=capt-tiny", "--set", "data.test_limit=null"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("capt: error: ") and "test-000000.tar" in err and "stale" in err and "\n" not in err
    assert main(["shards", "--index", str(tiny)]) == 0  # re-indexed: usable again
    load_task(DataConfig(path=str(tiny), shots=1), 6)
