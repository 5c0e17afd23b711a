"""Search scheduling overhead and fractional-GPU packing, on the search's own Tune + Optuna stack.

Run (about 4 minutes on 2 CPUs; a local Ray with one *logical* GPU, no real GPU needed):

    RAY_AUTH_MODE=disabled python benchmarks/bench_search.py --out benchmarks/results/bench_search.json

1. Overhead: N trials whose work is a known sleep (``--epochs`` x ``--epoch-s`` seconds, a checkpoint
   and a report per epoch), run through the product's searcher (``pipeline.search_algo.make_searcher``:
   Optuna TPE on SQLite RDB storage behind a ConcurrencyLimiter), ASHA and RunConfig (checkpoints kept
   2). Overhead per trial = (wall x observed concurrency - sum of in-trial times) / N: process start, scheduling,
   Optuna ask/tell, checkpoint persistence. The ``imports`` variant also imports what a real trial
   imports (torch, open_clip, mlflow, the pipeline) before its clock starts, and reports that time.
2. Packing: trials asking ``gpu: 0.25`` (then 0.5) of one logical GPU; the maximum number running at
   once is measured from the start / end timestamps the trials report.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import optuna  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from common import ROOT, record  # noqa: E402
from ray import tune  # noqa: E402

from pipeline.search_algo import make_scheduler, make_searcher  # noqa: E402
from pipeline.search_space import load_search  # noqa: E402

log = logging.getLogger("bench_search")


def sleepy_trial(config: dict[str, Any]) -> None:
    """A trial whose work is a known sleep; reports like the real one (per epoch, checkpoint, objective)."""
    t_import = 0.0
    if config["imports"]:
        t0 = time.time()
        import mlflow  # noqa: F401
        import open_clip  # noqa: F401

        import pipeline.task  # noqa: F401
        import pipeline.tracking  # noqa: F401
        import pipeline.train  # noqa: F401
        t_import = time.time() - t0
    start = time.time()
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["epoch_s"])
        folder = Path(tempfile.mkdtemp())
        (folder / "last.pt").write_bytes(b"0" * 20_000)  # about the size of a tiny prompt checkpoint
        metrics = {"epoch": epoch, "robust_acc": 0.5, "clean_acc": 0.6, "t_start": start, "t_end": time.time(),
                   "t_import": t_import}
        if epoch == config["epochs"]:
            metrics["objective_robust_acc"] = 0.5
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))


def run_scenario(name: str, *, n: int, epochs: int, epoch_s: float, concurrent: int, cpu: float, gpu: float,
                 imports: bool, work: Path) -> dict[str, Any]:
    """One Tune run; returns wall time, in-trial times and the observed concurrency."""
    spec = load_search(ROOT / "search_spaces" / "smoke.yaml", [
        f"search.name={name}", f"search.num_samples={n}", f"search.max_concurrent={concurrent}",
        f"base.optim.epochs={epochs}", "search.points_to_evaluate=[]"])
    storage = optuna.storages.RDBStorage(f"sqlite:///{work}/{name}.db")
    trainable = tune.with_resources(sleepy_trial, {"cpu": cpu, "gpu": gpu})
    tuner = tune.Tuner(
        trainable, param_space={"epochs": epochs, "epoch_s": epoch_s, "imports": imports},
        tune_config=tune.TuneConfig(search_alg=make_searcher(spec, storage), scheduler=make_scheduler(spec, epochs),
                                    num_samples=n, reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=str(work / "ray_results"), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    t0 = time.time()
    grid = tuner.fit()
    wall = time.time() - t0
    spans = [(r.metrics["t_start"], r.metrics["t_end"]) for r in grid if r.metrics and "t_end" in r.metrics]
    inside = sum(end - begin for begin, end in spans)
    imports_s = [r.metrics.get("t_import", 0.0) for r in grid if r.metrics]
    states = optuna.load_study(study_name=name, storage=storage).trials
    observed = max_overlap(spans)
    return {"scenario": name, "trials": n, "finished": len(spans), "concurrency_limit": concurrent,
            "resources": {"cpu": cpu, "gpu": gpu}, "trial_work_s": epochs * epoch_s, "wall_s": round(wall, 1),
            "sum_trial_s": round(inside, 1),
            "overhead_per_trial_s": round((wall * observed - inside) / n, 2),
            "import_s_mean": round(sum(imports_s) / max(len(imports_s), 1), 2),
            "max_concurrent_observed": observed,
            "optuna_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in states)}


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The largest number of [start, end] intervals that hold at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["scenario", "trials", "concurrency_limit", "resources", "trial_work_s", "wall_s", "sum_trial_s",
            "overhead_per_trial_s", "import_s_mean", "max_concurrent_observed", "optuna_complete"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--epoch-s", type=float, default=1.0)
    p.add_argument("--pack-trials", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_search.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cpus = os.cpu_count() or 2
    load_at_start = [round(v, 2) for v in os.getloadavg()]  # the machine is shared: record how busy it was
    ray.init(address="local", num_cpus=cpus, num_gpus=1, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        common = {"n": args.trials, "epochs": args.epochs, "epoch_s": args.epoch_s, "gpu": 0.0, "work": work}
        rows.append(run_scenario("overhead_c1", concurrent=1, cpu=1, imports=False, **common))
        rows.append(run_scenario("overhead_c1_imports", concurrent=1, cpu=1, imports=True, **common))
        rows.append(run_scenario(f"overhead_c{cpus}", concurrent=cpus, cpu=1, imports=False, **common))
        for gpu in (0.25, 0.5):
            rows.append(run_scenario(f"pack_gpu{gpu}", n=args.pack_trials, epochs=3, epoch_s=1.0, concurrent=8,
                                     cpu=cpus / 8, gpu=gpu, imports=False, work=work))
    ray.shutdown()
    print_table(rows)
    record(args.out, torch.device("cpu"), vars(args) | {"out": str(args.out), "load_average_at_start": load_at_start}, rows,
           notes=["one logical GPU (ray.init(num_gpus=1)) on a CPU machine: fractions are scheduling labels",
                  "overhead_per_trial_s = (wall_s * max_concurrent_observed - sum_trial_s) / trials"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
