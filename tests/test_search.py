"""The search on real components: a local Ray cluster, Optuna RDB storage (SQLite), an MLflow SQLite
store, digits shards. One smoke search (module fixture) is checked from several sides: the trial that
ASHA stops arrives in Optuna as PRUNED, finished ones as COMPLETE, the injected failure as FAIL (and
FAILED in MLflow) while the search goes on; MLflow holds one child run per trial with per-epoch
metrics; summary.json, the descriptions naming the best trial and the champion model (a pyfunc logged
in the best trial's run, predicting as `capt eval` does) are written."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import optuna
import pytest
import ray
import torch
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.clip import bare_model, register_model_configs
from pipeline.data.sources import shards_from_digits
from pipeline.search import TUNE_ID_ATTR, CaptOptunaSearch, make_searcher, run_search
from pipeline.search_space import load_search

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
OK, PRUNED, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "digits"
    shards_from_digits(out, progress=False)
    return out


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def smoke(local_ray, shards, tmp_path_factory):
    """4 trials in sequence: #1 scored at eps 0 (robust = clean), #2 at eps 64 (robust ~ 0: ASHA stops
    it after epoch 1), #3 raises at epoch 1 on every attempt (max_failures 1: retried once), #4 sampled
    by TPE. (The evaluation eps is searched here only to make the ASHA decision certain.)"""
    out = tmp_path_factory.mktemp("smoke")
    register_model_configs()
    torch.manual_seed(0)
    clip = out.parent / "capt-tiny.pt"  # CLIP weights from a file (as the demo's): `capt eval` rebuilds the same
    torch.save(bare_model("capt-tiny").state_dict(), clip)
    spec = load_search(SMOKE, [
        f"search.out={out}", f"base.data.path={shards}", "base.data.test_limit=100", f"base.model.checkpoint={clip}",
        "search.num_samples=4", "search.max_concurrent=1", "space.attack.eps=null",
        "space.eval.eps={type: categorical, choices: [0.0, 64.0]}",
        "search.points_to_evaluate=[{eval.eps: 0.0, loss.alpha_rule: ratio}, {eval.eps: 64.0}]",
        "search.inject_failure={trial_index: 3, epoch: 1}"])
    summary = run_search(spec)
    doc = json.loads((out / "summary.json").read_text())
    uri = doc["mlflow"]["tracking_uri"]
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{out}/optuna.db")
    runs = tracking.trial_runs(uri, doc["mlflow"]["experiment_id"], doc["mlflow"]["parent_run_id"])
    return {"out": out, "summary": summary, "doc": doc, "uri": uri, "study": study, "runs": runs}


def test_optuna_states_pruned_complete_failed(smoke):
    trials = sorted(smoke["study"].trials, key=lambda t: t.number)
    assert len(trials) == 4
    first, second, third = trials[:3]
    assert first.params["eval.eps"] == 0.0 and first.state == OK
    rows = {r["trial_id"]: r for r in smoke["doc"]["trials"]}
    assert first.values[0] == pytest.approx(rows[first.user_attrs[TUNE_ID_ATTR]]["robust_acc"])  # the final epoch's
    assert set(first.intermediate_values) == {1}  # per-epoch values before the last one
    assert second.params["eval.eps"] == 64.0 and second.state == PRUNED, (first.intermediate_values, second)
    assert second.values is None  # the stopped trial's partial accuracy did not reach TPE as a result
    assert third.state == FAIL
    assert trials[3].state in (OK, PRUNED)
    assert len({t.user_attrs[TUNE_ID_ATTR] for t in trials}) == 4


def test_mlflow_one_child_per_trial_with_epoch_metrics(smoke):
    client = MlflowClient(smoke["uri"])
    runs = smoke["runs"]
    assert len(runs) == 4 and len({r.data.tags["trial_id"] for r in runs}) == 4
    by_state = {}
    for r in runs:
        by_state.setdefault(r.data.tags.get("trial_state"), []).append(r)
        assert r.data.tags["method"] == "capt" and r.data.tags["model"] == "capt-tiny"
        assert "loss.lam" in r.data.params and r.data.params["method"] == "capt"
    done = by_state["COMPLETE"][0]
    assert done.info.status == "FINISHED"
    for name in ("clean_acc", "robust_acc", "loss_ce", "loss_cons_train", "loss_cons_frozen", "alpha", "lr",
                 "epoch_time_s"):
        assert [m.step for m in client.get_metric_history(done.info.run_id, name)] == [1, 2], name
    assert {a.path for a in client.list_artifacts(done.info.run_id)} >= {"prompts.pt", "config.yaml"}
    assert done.data.params["eval.attack"] == "pgd" and done.data.params["eval.steps"] == "2"  # what measured
    assert done.data.params["robust_acc.measured_by"] == f"PGD-2 at eps {float(done.data.params['eval.eps']):g}/255 (L-inf)"
    pruned = by_state["PRUNED"][0]  # stopped by ASHA: a normal end, not shown as a crash
    assert pruned.info.status == "FINISHED" and pruned.info.run_name.endswith(" · pruned@epoch 1")
    assert "**Pruned** by the ASHA scheduler after epoch 1 of 2" in pruned.data.tags[tracking.NOTE_TAG]
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "robust_acc")] == [1]
    failed = by_state["FAIL"][0]
    assert failed.info.status == "FAILED" and "injected failure" in failed.data.tags["error"]
    assert failed.info.run_name.endswith(" · failed") and done.info.run_name.endswith(" · complete")
    for r in runs:  # provenance: this checkout's commit and the command line
        assert len(r.data.tags[tracking.GIT_TAG]) == 40 and r.data.tags[tracking.COMMAND_TAG]


def test_parent_run_summary_plots_and_champion(smoke, tmp_path):
    doc, uri = smoke["doc"], smoke["uri"]
    client = MlflowClient(uri)
    parent = client.get_run(doc["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["capt.role"] == "search"
    assert {"best_clean_acc", "best_pgd10_acc", "best_robust_acc", "n_complete", "n_fail"} <= set(parent.data.metrics)
    assert parent.data.metrics["n_fail"] == 1
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/tradeoff.png", "plots/acc_vs_eps.png"} <= plots
    assert doc["counts"]["FAIL"] == 1 and doc["counts"]["PRUNED"] >= 1 and doc["counts"]["COMPLETE"] >= 1
    assert len(doc["trials"]) == 4 and doc["optuna"]["states"]["FAIL"] == 1
    best = doc["best"][0]
    assert best["state"] == "COMPLETE" and {"clean_acc", "pgd10_acc", "pgd10_acc_eps2"} <= set(best["final"])
    assert doc["metrics"]["pgd10_acc"] == best["final"]["pgd10_acc"]
    assert doc["mlflow"]["ui"] == f"mlflow ui --backend-store-uri {uri}"
    assert doc["mlflow"]["url"].endswith(f"/#/experiments/{doc['mlflow']['experiment_id']}"
                                         "?workflowType=machine_learning")
    for name in ("tradeoff.png", "acc_vs_eps.png"):  # the logged copy is the saved file
        logged = tracking.download(uri, f"runs:/{parent.info.run_id}/plots/{name}", tmp_path / "plots")
        assert logged.read_bytes() == (smoke["out"] / "plots" / name).read_bytes()
    assert {"zeroshot_clean_acc", "zeroshot_pgd10_acc"} <= set(parent.data.metrics)
    assert set(doc["zero_shot"]) == set(best["final"])  # zero-shot CLIP under the same attacks and eps


def test_descriptions_name_the_best_trial_and_link_its_run(smoke):
    doc, client = smoke["doc"], MlflowClient(smoke["uri"])
    parent = client.get_run(doc["mlflow"]["parent_run_id"])
    best, best_run = doc["best"][0], parent.data.tags[tracking.BEST_TAG]
    assert best_run == best["run_id"] == doc["mlflow"]["best_run_id"]
    child = client.get_run(best_run)
    assert child.data.tags[tracking.PARENT_TAG] == parent.info.run_id and child.data.tags["trial_id"] == best["trial_id"]
    exp = client.get_experiment(doc["mlflow"]["experiment_id"])
    assert child.info.run_name.startswith(f"{best['name']} · ") and best["name"].endswith(best["trial_id"])
    link = f"[{best['name']}](#/experiments/{exp.experiment_id}/runs/{best_run})"
    for note in (parent.data.tags[tracking.NOTE_TAG], exp.tags[tracking.NOTE_TAG]):
        assert f"**Best trial: {link}**" in note
        assert "| `loss.lam` | float, log | [0.1, 10] |" in note  # the space with its ranges
        assert "PGD-2 at each trial's own eval eps (searched" in note and "1/255" in note  # eval.eps is searched
        assert "1 failed (pruned: stopped early by ASHA" in note and "zero-shot CLIP" in note
    assert f"(#/experiments/{exp.experiment_id}/runs/{parent.info.run_id})" in exp.tags[tracking.NOTE_TAG]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs


def test_champion_from_the_best_trial_predicts_as_capt_eval(smoke, tmp_path):
    """models:/capt-smoke@champion is a pyfunc logged in the best trial's run; its predictions give the
    clean accuracy that `capt eval` reports for the same prompts on the same images."""
    import dataclasses

    import mlflow.pyfunc
    import numpy as np

    from pipeline.cli import main as capt
    from pipeline.config import from_dict
    from pipeline.data.pixels import as_pixels
    from pipeline.runs import load_run
    from pipeline.search_report import image_size
    from pipeline.task import load_task

    doc, uri, client = smoke["doc"], smoke["uri"], MlflowClient(smoke["uri"])
    version = client.get_model_version_by_alias("capt-smoke", "champion")
    assert str(version.version) == doc["mlflow"]["registered_model"]["version"]
    assert version.run_id == doc["best"][0]["run_id"]  # logged from the best trial, not the parent
    assert "Robust accuracy, pgd10 at eps" in version.description and "mlflow.pyfunc.load_model" in version.description
    run_dir = tmp_path / "run"
    got = tracking.download(uri, f"runs:/{doc['mlflow']['parent_run_id']}/best_prompts/prompts.pt", run_dir)
    assert got == run_dir / "prompts.pt"  # a run folder for `capt eval`
    shards = doc["config"]["base"]["data"]["path"]
    assert capt(["eval", "--run", str(run_dir), "--data", shards, "--attack", "pgd10", "--eps", "1", "--limit", "40",
                 "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    ev = json.loads((tmp_path / "eval" / "summary.json").read_text())
    cfg = from_dict(ev["config"])
    with tracking._env(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri):
        model = mlflow.pyfunc.load_model("models:/capt-smoke@champion")
    task = load_task(dataclasses.replace(cfg.data, classes="all"), image_size("capt-tiny"))
    probs = model.predict(as_pixels(task.test_x).numpy())  # float [0, 1], as the signature says
    assert probs.shape == (40, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    acc = float((probs.argmax(1) == task.test_y.numpy()).mean())
    assert acc == pytest.approx(ev["metrics"]["clean_acc"], abs=1e-6)
    _, direct = load_run(run_dir)  # image by image too (near-chance accuracy on random CLIP weights)
    with torch.no_grad():
        expected = torch.softmax(direct(as_pixels(task.test_x)), dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_a_second_search_with_the_same_name_is_refused(smoke):
    from pipeline.config import ConfigError

    spec = load_search(SMOKE, [f"search.out={smoke['out']}", f"base.data.path={smoke['doc']['config']['base']['data']['path']}"])
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        run_search(spec)


def test_restored_searcher_reuses_an_orphaned_optuna_trial(tmp_path):
    """A driver killed between asking Optuna for a trial and saving Tune's state must not leave an extra trial."""
    spec = load_search(SMOKE, ["search.points_to_evaluate=[{attack.eps: 0.0}]"])
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    searcher = make_searcher(spec, storage).searcher
    assert isinstance(searcher, CaptOptunaSearch)
    first = searcher.suggest("a")
    assert first["attack.eps"] == 0.0  # points_to_evaluate come first
    searcher.on_trial_result("a", {"robust_acc": 0.25, "epoch": 1})  # no objective yet: tolerated
    searcher.save(str(tmp_path / "searcher.pkl"))
    lost = searcher.suggest("b")  # asked, then the driver dies before Tune saves its state
    restored = pickle.loads(pickle.dumps(CaptOptunaSearch.__new__(CaptOptunaSearch)))
    restored.restore(str(tmp_path / "searcher.pkl"))
    again = restored.suggest("c")
    assert again == lost
    assert restored.suggest("d") != lost  # the restored sampler does not draw the orphan's values again
    study = optuna.load_study(study_name="smoke", storage=storage)
    assert len(study.trials) == 3
    assert [t.user_attrs[TUNE_ID_ATTR] for t in study.trials] == ["a", "c", "d"]
    assert study.trials[0].intermediate_values == {1: 0.25}
    restored.on_trial_complete("c", {"robust_acc": 0.1, "epoch": 1})  # stopped early: no objective
    restored.on_trial_complete("d", {"objective_robust_acc": 0.3, "robust_acc": 0.3})
    states = [t.state for t in optuna.load_study(study_name="smoke", storage=storage).trials]
    assert states[1:] == [PRUNED, OK]


def test_two_objectives_pareto_front_and_searcher(tmp_path):
    from pipeline.search_report import pareto_front, select_best

    spec = load_search(SMOKE, ["search.objectives=[clean_acc, robust_acc]", "search.points_to_evaluate=[]"])
    rows = [{"trial_id": str(i), "state": s, "clean_acc": c, "robust_acc": r}
            for i, (s, c, r) in enumerate([("COMPLETE", 0.9, 0.1), ("COMPLETE", 0.5, 0.4), ("COMPLETE", 0.4, 0.3),
                                           ("COMPLETE", 0.2, 0.5), ("PRUNED", 0.95, 0.6), ("FAIL", None, None)])]
    assert [r["trial_id"] for r in pareto_front(rows[:4], ["clean_acc", "robust_acc"])] == ["0", "1", "3"]
    assert [r["trial_id"] for r in select_best(rows, spec)] == ["3", "1", "0"]  # by robust accuracy
    single = load_search(SMOKE, ["search.top_k=2"])
    assert [r["trial_id"] for r in select_best(rows, single)] == ["3", "1"]
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    searcher = make_searcher(spec, storage).searcher
    for tid in ("a", "b"):
        searcher.suggest(tid)
        searcher.on_trial_result(tid, {"robust_acc": 0.2, "epoch": 1})
    searcher.on_trial_complete("a", {"objective_clean_acc": 0.7, "objective_robust_acc": 0.3})
    searcher.on_trial_complete("b", {"robust_acc": 0.2, "clean_acc": 0.5})  # stopped by ASHA
    study = optuna.load_study(study_name="smoke", storage=storage)
    assert [t.state for t in study.trials] == [OK, PRUNED] and study.trials[0].values == [0.7, 0.3]


def test_search_note_and_trial_labels():
    """The markdown the UI shows, from rows as finish() has them (fast: no search)."""
    from pipeline.search_notes import search_note, trial_label, trial_note

    spec = load_search(SMOKE, [])
    rows = [{"trial_id": "a", "name": "trial_001_a", "run_id": "r1", "state": "COMPLETE", "epochs": 2, "clean_acc": 0.5,
             "robust_acc": 0.3, "params": {"loss.lam": 2.0, "attack.eps": 1.0}},
            {"trial_id": "b", "name": "trial_002_b", "run_id": "r2", "state": "PRUNED", "epochs": 1, "clean_acc": 0.6,
             "robust_acc": 0.1, "params": {"loss.lam": 0.2, "attack.eps": 4.0}},
            {"trial_id": "c", "name": "trial_003_c", "run_id": "r3", "state": "FAIL", "epochs": None, "clean_acc": None,
             "robust_acc": None, "params": {"loss.lam": 9.0}}]
    best = [{**rows[0], "eps": 1.0, "final": {"clean_acc": 0.5, "pgd10_acc": 0.3, "pgd10_acc_eps2": 0.2},
             "zero_shot": {"clean_acc": 0.4, "pgd10_acc": 0.1, "pgd10_acc_eps2": 0.05}}]
    note = search_note(spec, spec.base, experiment_id="7", parent_id="p", rows=rows, best=best,
                       counts={"COMPLETE": 1, "PRUNED": 1, "FAIL": 1}, registered=None, for_experiment=True)
    assert "**Best trial: [trial_001_a](#/experiments/7/runs/r1)**" in note and "(#/experiments/7/runs/p)" in note
    assert "| `loss.lam` | float, log | [0.1, 10] |" in note and "| `attack.eps` | categorical | 0.0, 1.0, 4.0 |" in note
    assert "PGD-2 at each trial's own eval eps" not in note and "PGD-2 at eps 1/255 (L-inf)" in note
    assert note.index("[trial_001_a]") < note.index("[trial_002_b]") < note.index("[trial_003_c]")
    assert "| zero-shot CLIP (no prompts) | 0.400 | 0.100 | 0.050 |" in note and "1 failed" in note
    assert trial_label("PRUNED", 1) == "pruned@epoch 1" and trial_label("FAIL", None) == "failed"
    assert "after epoch 1 of 2" in trial_note("PRUNED", {"epoch": 1, "robust_acc": 0.0}, 2)
    assert "(grace period 1, reduction factor 2)" in note  # smoke.yaml's own
    bare = load_search(SMOKE, ["search.scheduler={type: asha}"])  # left out: the scheduler's defaults, said as used
    assert "(grace period 2, reduction factor 2)" in search_note(
        bare, bare.base, experiment_id="7", parent_id="p", rows=rows, best=best, counts={}, registered=None,
        for_experiment=True)
