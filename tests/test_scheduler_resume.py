"""A resumed search stops the trials an uninterrupted one would: ASHA's rungs are rebuilt from the
recorded events (pipeline/search_resume.py), and without that rebuild the decisions differ."""

from __future__ import annotations

import json
import pickle
import random

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from pipeline.search_resume import EVENTS_FILE, RecordedScheduler

EPOCHS = 4


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def asha() -> ASHAScheduler:
    return ASHAScheduler(time_attr="epoch", metric="robust_acc", mode="max", max_t=EPOCHS, grace_period=1,
                         reduction_factor=2)


def curves(seed: int, n: int = 8) -> dict[str, list[float]]:
    rng = random.Random(seed)
    return {f"t{i}": [rng.random() * (1 + e / 4) for e in range(EPOCHS)] for i in range(n)}


def drive(sched: TrialScheduler, values: dict[str, list[float]], seed: int, *, stop_after: int | None = None,
          state: dict | None = None) -> dict:
    """Run trials two at a time (as max_concurrent=2 would) through ``sched`` like Tune's controller:
    add, one result per epoch, STOP ends a trial, the last epoch completes it. ``state`` continues an
    interrupted run: its running trials are re-added (a restore) and report again from their last
    checkpoint (their last reported epoch), as restored trials do."""
    st = state or {"pending": list(values), "running": {}, "decisions": {}, "added": [], "steps": 0}
    if state is not None:  # restore: Tune re-adds every trial of the experiment, then the running ones go on
        for tid in st["added"]:
            sched.on_trial_add(None, FakeTrial(tid))
        for tid, epoch in st["running"].items():  # restarted from their checkpoint: the last epoch again
            if epoch:
                again = {"epoch": epoch, "training_iteration": epoch, "robust_acc": values[tid][epoch - 1]}
                decision = sched.on_trial_result(None, FakeTrial(tid), again)
                if isinstance(sched, RecordedScheduler):  # the first answer, not a new judgement
                    assert decision == st["decisions"][(tid, epoch)]
    while st["pending"] or st["running"]:
        while len(st["running"]) < 2 and st["pending"]:
            tid = st["pending"].pop(0)
            sched.on_trial_add(None, FakeTrial(tid))
            st["added"].append(tid)
            st["running"][tid] = 0
        if stop_after is not None and st["steps"] >= stop_after:
            return st
        rng = random.Random(seed * 7919 + st["steps"])  # the same interleaving with or without a restart
        tid = rng.choice(sorted(st["running"]))
        epoch = st["running"][tid] + 1
        result = {"epoch": epoch, "training_iteration": epoch, "robust_acc": values[tid][epoch - 1]}
        decision = sched.on_trial_result(None, FakeTrial(tid), result)
        st["decisions"].setdefault((tid, epoch), decision)
        st["steps"] += 1
        if decision == TrialScheduler.STOP or epoch == EPOCHS:
            sched.on_trial_complete(None, FakeTrial(tid), result)
            del st["running"][tid]
        else:
            st["running"][tid] = epoch
    return st


def test_resumed_asha_decides_as_an_uninterrupted_one(tmp_path):
    naive_differs = 0
    for seed in range(4):
        values = curves(seed)
        straight = drive(RecordedScheduler(asha(), str(tmp_path / f"a{seed}")), values, seed)["decisions"]
        assert TrialScheduler.STOP in straight.values()  # the search has early stops to get right
        for cut in (3, 6, 9, 12):
            built = RecordedScheduler(asha(), str(tmp_path / f"b{seed}_{cut}"))
            snapshot = pickle.dumps(built)  # what tuner.pkl holds: the scheduler as first built
            st = drive(built, values, seed, stop_after=cut)
            restored = pickle.loads(snapshot)  # Tuner.restore: no rungs, only the path to the log
            assert restored.events() and not restored._loaded
            resumed = drive(restored, values, seed, state=st)["decisions"]
            assert resumed == straight, (seed, cut)

            plain = asha()  # what Tune gives back without the log: ASHA as first built
            st = drive(asha(), values, seed, stop_after=cut)
            naive_differs += drive(plain, values, seed, state=st)["decisions"] != straight
    assert naive_differs > 0, "the interruption points never mattered: the test would not catch a lost state"


def test_events_are_recorded_in_order_with_decisions_and_replayed_once(tmp_path):
    sched = RecordedScheduler(asha(), str(tmp_path / "exp"))
    drive(sched, curves(0, n=3), 0)
    lines = [json.loads(x) for x in (tmp_path / "exp" / EVENTS_FILE).read_text().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
    assert {e["event"] for e in lines} == {"add", "result", "complete"}
    assert all(e["decision"] in (TrialScheduler.CONTINUE, TrialScheduler.STOP) for e in lines if e["event"] == "result")
    again = pickle.loads(pickle.dumps(sched))
    assert again._decisions == {} and not again._loaded  # the pickled state carries no history
    again.on_trial_add(None, FakeTrial("t0"))  # a restored trial: already known, not recorded twice
    assert len((tmp_path / "exp" / EVENTS_FILE).read_text().splitlines()) == len(lines)
    assert again._decisions == sched._decisions
