"""The `capt` command line end to end on tiny settings: shards -> tiny CLIP -> train -> eval."""

import json
import subprocess
import sys

import pytest

from pipeline.cli import main

TINY = ["--set", "model.name=capt-tiny", "--set", "optim.epochs=1", "--set", "data.shots=2",
        "--set", "data.test_limit=24", "--set", "eval.steps=2", "--set", "eval.final_attacks=[pgd10]",
        "--set", "prompt.depth=2", "--set", "optim.batch_size=10"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits"
    assert main(["shards", "--demo", "digits", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(digits, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    assert main(["tiny-clip", "--data", str(digits), "--out", str(ckpt), "--model", "capt-tiny",
                 "--steps", "10", "--batch-size", "16"]) == 0
    return ckpt


def test_train_then_eval(digits, tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", "configs/capt.yaml", "--out", str(run), *TINY,
            "--set", f"data.path={digits}", "--set", f"model.checkpoint={tiny_ckpt}"]
    assert main(args) == 0
    assert f"summary: {run / 'summary.json'}" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["method"] == "capt" and summary["config"]["model"]["checkpoint"] == str(tiny_ckpt)
    m = summary["metrics"]
    assert {"clean_acc", "pgd10_acc", "robust_acc", "train_seconds"} <= set(m)
    assert m["robust_acc"] <= m["clean_acc"]
    assert len(summary["history"]) == 1 and summary["data"]["train_samples"] == 20
    assert (run / "prompts.pt").is_file() and (run / "checkpoints" / "last.pt").is_file()

    out = tmp_path / "eval"
    assert main(["eval", "--run", str(run), "--data", str(digits), "--attack", "pgd10",
                 "--eps", "2", "8", "--limit", "20", "--base-to-new", "--cross", str(digits), "--out", str(out)]) == 0
    e = json.loads((out / "summary.json").read_text())["metrics"]
    for key in ("base_clean_acc", "new_clean_acc", "hm_clean_acc", "base_pgd10_acc", "new_pgd10_acc_eps8",
                "xd_digits_clean_acc", "xd_digits_pgd10_acc"):
        assert key in e, key
    assert e["base_pgd10_acc_eps8"] <= e["base_pgd10_acc"] <= e["base_clean_acc"]


def test_bad_inputs_are_one_line_errors(digits, tmp_path, capsys):
    cases = [
        (["train", "--config", "configs/capt.yaml", "--out", str(tmp_path / "a"), "--set", "loss.lamda=1"],
         "loss.lamda"),
        (["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "b")], "none.yaml"),
        (["train", "--config", "configs/capt.yaml", "--out", str(tmp_path / "c"), *TINY,
          "--set", f"data.path={tmp_path / 'nodata'}"], "nodata"),
        (["train", "--config", "configs/capt.yaml", "--out", str(tmp_path / "d"), *TINY,
          "--set", f"data.path={digits}", "--set", "prompt.depth=9"], "prompt.depth=9"),
        (["eval", "--run", str(tmp_path / "norun"), "--data", str(digits), "--out", str(tmp_path / "e")], "norun"),
        (["shards", "--demo", "digits", "--out", str(digits)], str(digits)),
    ]
    before = sorted(p.name for p in digits.iterdir())
    for argv, culprit in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("capt: error:") and culprit in err and "\n" not in err, err
    assert sorted(p.name for p in digits.iterdir()) == before  # nothing already written was lost


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("shards", "tiny-clip", "train", "eval", "demo"):
        assert name in out.stdout


def test_a_random_init_run_reloads_the_same_clip(digits, tmp_path):
    """A run whose CLIP has no weights file (random init, seeded by run.seed in training) reloads the same
    frozen CLIP whatever the caller's RNG state, so `capt eval` / `capt tapt` measure the trained model."""
    import torch

    from pipeline.runs import load_run

    run = tmp_path / "run"
    assert main(["train", "--config", "configs/zeroshot.yaml", "--out", str(run), *TINY,
                 "--set", f"data.path={digits}", "--set", "eval.final_attacks=[]"]) == 0
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        _, model = load_run(run)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
