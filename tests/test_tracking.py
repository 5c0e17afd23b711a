"""The MLflow adapter on a real SQLite store: nested runs keyed by trial id, statuses, the champion alias,
and a tracking server that is down (a one-line error before any trial starts)."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.config import ConfigError
from pipeline.search import main as search_main


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlflow")
    uri = tracking.resolve_uri(None, out)
    tracking.probe(uri)  # creates the SQLite schema once
    exp = tracking.ensure_experiment(uri, "unit", out / "mlartifacts")
    return uri, exp, out


def _parent(store, key):
    uri, exp, _ = store
    return tracking.start_parent(uri, exp, search_key=key, run_name=key, tags={"method": "capt"},
                                 params={"search.num_samples": 2},
                                 config={"search": {"optuna_storage": "postgresql://u:secret@db/optuna"}})


def test_default_uri_is_sqlite_and_file_store_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_uri(None, tmp_path) == "http://mlflow:5000"
    assert tracking.resolve_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"
    for bad in ("./mlruns", "file:///tmp/mlruns"):
        with pytest.raises(ConfigError, match="file store"):
            tracking.resolve_uri(bad, tmp_path)


def test_parent_is_reused_by_search_key_and_config_is_redacted(store, tmp_path):
    uri, exp, _ = store
    first, reused = _parent(store, "exp-a")
    again, reused2 = _parent(store, "exp-a")
    other, _ = _parent(store, "exp-b")
    assert (reused, reused2) == (False, True) and first == again != other
    text = tracking.download(uri, f"runs:/{first}/search_config.yaml", tmp_path).read_text()
    assert "secret" not in text and "u:***@db" in text


def test_child_runs_are_keyed_by_trial_id(store, tmp_path):
    uri, exp, _ = store
    parent, _ = _parent(store, "exp-children")
    run = tracking.TrialRun(uri, exp, parent, "abc123", run_name="trial_001_abc123", tags={"method": "capt"})
    run.log_params({"loss.lam": 2.0, "method": "capt"})
    for epoch in (1, 2):
        run.log_epoch({"epoch": epoch, "clean_acc": 0.5 + epoch / 10, "robust_acc": 0.2, "loss": float("nan")}, epoch)
    (tmp_path / "prompts.pt").write_bytes(b"weights")
    run.log_file(tmp_path / "prompts.pt")
    again = tracking.TrialRun(uri, exp, parent, "abc123", run_name="x", tags={})  # a retried / resumed trial
    again.log_params({"loss.lam": 2.0, "method": "capt"})  # the same params again: no error
    assert again.resumed and again.run_id == run.run_id
    tracking.TrialRun(uri, exp, parent, "def456", run_name="trial_002_def456", tags={})
    children = tracking.trial_runs(uri, exp, parent)
    assert sorted(r.data.tags["trial_id"] for r in children) == ["abc123", "def456"]
    history = MlflowClient(uri).get_metric_history(run.run_id, "clean_acc")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 0.6), (2, 0.7)]
    assert "loss" not in MlflowClient(uri).get_run(run.run_id).data.metrics  # NaN is not logged
    assert [a.path for a in MlflowClient(uri).list_artifacts(run.run_id)] == ["prompts.pt"]


def test_trial_status_failed_and_pruned(store):
    uri, exp, _ = store
    parent, _ = _parent(store, "exp-status")
    tracking.TrialRun(uri, exp, parent, "t1", run_name="t1", tags={})
    tracking.TrialRun(uri, exp, parent, "t2", run_name="t2", tags={})
    tracking.set_trial_status(uri, exp, parent, "t1", "FAILED", "FAIL")
    tracking.set_trial_status(uri, exp, parent, "t2", "FINISHED", "PRUNED", note="**Pruned**", label="pruned@epoch 1")
    runs = {r.data.tags["trial_id"]: r for r in tracking.trial_runs(uri, exp, parent)}
    assert runs["t1"].info.status == "FAILED" and runs["t1"].data.tags["trial_state"] == "FAIL"
    assert runs["t2"].info.status == "FINISHED" and runs["t2"].data.tags["trial_state"] == "PRUNED"
    assert runs["t2"].info.run_name == "t2 · pruned@epoch 1" and runs["t2"].data.tags[tracking.NOTE_TAG] == "**Pruned**"
    tracking.set_trial_status(uri, exp, parent, "t2", "FINISHED", "PRUNED", label="pruned@epoch 1")  # again: one suffix
    assert tracking.MlflowClient(uri).get_run(runs["t2"].info.run_id).info.run_name == "t2 · pruned@epoch 1"


def _prompts_file(tmp_path, lam: float):
    """A prompts file of a capt-tiny CLIP whose weights are a local checkpoint (as in the demo)."""
    from pipeline.clip import bare_model, register_model_configs
    from pipeline.config import Config
    from pipeline.prompts import PromptedCLIP
    from pipeline.train import build_model

    from .conftest import CLASSES, TEMPLATES

    register_model_configs()
    torch.manual_seed(1)
    ckpt = tmp_path / "clip.pt"
    torch.save(bare_model("capt-tiny").state_dict(), ckpt)
    cfg = Config().replace(**{"model.checkpoint": str(ckpt), "prompt.depth": 2, "loss.lam": lam})
    model: PromptedCLIP = build_model(cfg, CLASSES, TEMPLATES, torch.device("cpu"))
    state = {k: torch.randn_like(v) * 0.1 for k, v in model.prompt_state().items()}
    path = tmp_path / "prompts.pt"
    torch.save({"prompts": state, "config": cfg.to_dict(), "classnames": CLASSES, "templates": TEMPLATES}, path)
    model.load_prompt_state(state)
    return path, ckpt, model.eval()


def test_champion_is_a_pyfunc_model_logged_in_the_given_run(store, tmp_path):
    """The registered version: source run = the run given (a trial's), description, MLmodel with a
    signature; loads through models:/name@champion with no pickle and predicts class probabilities."""
    import mlflow.pyfunc
    import numpy as np

    from pipeline import champion, champion_model

    uri, exp, _ = store
    parent, _ = _parent(store, "exp-register")
    trial = tracking.TrialRun(uri, exp, parent, "best", run_name="trial_001_best", tags={}).run_id
    path, ckpt, model = _prompts_file(tmp_path, 2.0)
    v1 = champion.register_champion(uri, trial, path, "capt-unit", "first")
    v2 = champion.register_champion(uri, trial, path, "capt-unit", "**what** it is")  # a later search
    assert (v1, v2) == ("1", "2") and tracking.champion_version(uri, "capt-unit") == "2"
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("capt-unit", "champion")
    assert version.run_id == trial and version.description == "**what** it is"
    files = {a.path for a in client.list_artifacts(trial, "champion")}
    assert {"champion/MLmodel", "champion/artifacts", "champion/code"} <= files, files
    assert not any(f.endswith(".pkl") for f in files)
    ckpt.unlink()  # the CLIP weights travel with the model
    images = torch.rand(5, 3, model.image_size, model.image_size)
    with tracking._env(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri):
        loaded = mlflow.pyfunc.load_model("models:/capt-unit@champion")
        probs = loaded.predict(images.numpy())
    assert tuple(loaded.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (
        -1, 3, model.image_size, model.image_size)
    with torch.no_grad():
        expected = torch.softmax(model(images), dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert probs.shape == (5, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    bad = tmp_path / "code.pt"
    torch.save({"prompts": {"x": torch.ones(1)}, "config": {}, "classnames": [], "templates": [],
                "hook": tracking.TrialRun}, bad)  # a pickled class: refused
    with pytest.raises(ConfigError, match="not a plain weights file"):
        champion_model.read_prompts(bad)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_line_error_before_ray(tmp_path, capsys):
    import ray

    url = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="unreachable") as info:
        tracking.probe(url, timeout_s=2)
    assert "\n" not in str(info.value) and time.perf_counter() - t0 < 10
    code = search_main(["--config", "search_spaces/smoke.yaml", "--set", f"tracking.uri={url}",
                        "--set", f"search.out={tmp_path}", "--set", "base.data.path=tests"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("search: error:") and "unreachable" in err
    assert not ray.is_initialized() and not (tmp_path / "ray_results").exists()
