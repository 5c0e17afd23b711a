"""The driver as users run it, in subprocesses: killed mid-search and resumed (nothing lost, nothing
twice), and the cluster path through `ray job submit` (marked slow)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.data.sources import shards_from_digits
from pipeline.search import TUNE_ID_ATTR
from pipeline.search_algo import make_scheduler
from pipeline.search_resume import EVENTS_FILE
from pipeline.search_space import load_search

ROOT = Path(__file__).resolve().parent.parent
SMOKE = "search_spaces/smoke.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "digits"
    shards_from_digits(out, progress=False)
    return out


@pytest.fixture
def ray_tmp():
    """A short private Ray temp dir (socket paths are length-limited); leftovers killed by pid after."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield path
    _kill_leftovers(path)


def _kill_leftovers(marker: str) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="ignore")
            env = (proc / "environ").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if marker in cmd or marker in env:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def _env(ray_tmp: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "CAPT_TEST_MARKER": ray_tmp}


def _search_cmd(out: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "pipeline/search.py", "--config", SMOKE, "--set", f"search.out={out}",
            "--set", f"base.data.path={shards}", *extra]


def _complete_trials(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_stores(out: Path, n: int) -> tuple[list, list]:
    """Optuna: n finished trials, one per Tune trial; MLflow: n terminal child runs, unique by trial id."""
    doc = json.loads((out / "summary.json").read_text())
    trials = optuna.load_study(study_name="smoke", storage=f"sqlite:///{out}/optuna.db").trials
    assert len(trials) == n, [(t.number, t.state) for t in trials]
    assert all(t.state.is_finished() for t in trials)
    assert len({t.user_attrs[TUNE_ID_ATTR] for t in trials}) == n
    m = doc["mlflow"]
    runs = tracking.trial_runs(m["tracking_uri"], m["experiment_id"], m["parent_run_id"])
    assert len(runs) == n and len({r.data.tags["trial_id"] for r in runs}) == n
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    assert len(doc["trials"]) == n and doc["best"]
    return trials, runs


def test_driver_killed_then_resumed_loses_and_duplicates_nothing(shards, ray_tmp, tmp_path):
    out = tmp_path / "out"
    cmd = _search_cmd(out, shards, "--set", "search.max_concurrent=1", "--resume")  # --resume: fresh when new
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(ray_tmp), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while _complete_trials(out / "optuna.db") < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the search ended before it could be killed: " + (tmp_path / "first.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    _kill_leftovers(ray_tmp)
    done_before = optuna.load_study(study_name="smoke", storage=f"sqlite:///{out}/optuna.db").trials
    finished_ids = {t.user_attrs[TUNE_ID_ATTR] for t in done_before if t.state.is_finished()}
    assert not (out / "summary.json").exists()

    again = subprocess.run(cmd, cwd=ROOT, env=_env(ray_tmp), capture_output=True, text=True, timeout=400)
    (tmp_path / "second.log").write_text(again.stdout + again.stderr)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the search" in again.stdout + again.stderr
    _, runs = _check_stores(out, 3)
    client = MlflowClient(json.loads((out / "summary.json").read_text())["mlflow"]["tracking_uri"])
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "robust_acc")]
        if run.data.tags["trial_id"] in finished_ids:  # completed before the kill: not run again
            assert steps == sorted(set(steps)) and steps[0] == 1, steps
    assert_asha_as_uninterrupted(out / "ray_results" / "smoke", load_search(ROOT / SMOKE, []), epochs=2)


def assert_asha_as_uninterrupted(experiment: Path, spec, epochs: int) -> None:
    """The decisions the drivers took (before and after the restart) are those of one fresh ASHA replaying
    the same results in the same order: the resumed driver had the rungs of the killed one."""
    events = [json.loads(x) for x in (experiment / EVENTS_FILE).read_text().splitlines() if x.strip()]
    assert [e["event"] for e in events].count("result") >= 3
    fresh = make_scheduler(spec, epochs)
    for e in events:
        trial = type("Trial", (), {"trial_id": e["trial_id"]})()
        if e["event"] == "add":
            fresh.on_trial_add(None, trial)
        elif e["event"] == "result":
            assert fresh.on_trial_result(None, trial, e["result"]) == e["decision"], e
        elif e["event"] == "complete":
            fresh.on_trial_complete(None, trial, e["result"])


@pytest.mark.slow  # about 2 minutes on 2 busy cores (a Ray head with its dashboard, then the job)
def test_ray_job_submit_end_to_end(shards, ray_tmp, tmp_path):
    port = _free_port()
    env = _env(ray_tmp)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
         "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={ray_tmp}", f"--port={_free_port()}",
         f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_dashboard(port, head, tmp_path / "head.log")
        out = tmp_path / "out"
        submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", ".",
                  "--", *(["python"] + _search_cmd(out, shards)[1:])]
        r = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
        assert r.returncode == 0 and "succeeded" in r.stdout.lower(), r.stdout[-3000:] + r.stderr[-2000:]
        _check_stores(out, 3)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ending `ray start --block` ends the cluster
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _wait_for_dashboard(port: int, head: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited: " + log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("the Ray dashboard did not come up: " + log.read_text()[-2000:])
