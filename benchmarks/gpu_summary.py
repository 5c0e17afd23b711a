"""Fold the GPU check's outputs into ``summary.json`` (stage status, tests, headline figures, goals) and print
the table that ends benchmarks/gpu_check.sh's output.

    python benchmarks/gpu_summary.py OUT_DIR [STAGE_STATE_JSON]

Exit status 1 when a stage did not finish, a test failed, or a file a finished stage should have written
is missing; the goals (MFU >= 35%, TAPT < 10 ms per image) are reported, not enforced.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

MFU_GOAL, TAPT_GOAL_MS = 0.35, 10.0


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests(path: Path) -> dict[str, Any] | None:
    """Counts and failures from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    failed = []
    for case in suite.iter("testcase"):
        for tag in ("failure", "error"):
            bad = case.find(tag)
            if bad is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                               "message": (bad.get("message") or "")[:300]})
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
            "seconds": float(suite.get("time", 0)), "failed": failed}


def step(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fused CAPT step of a bench_step.py record, with memory and profile where measured."""
    if not doc:
        return None
    block = doc["results"][0]
    name = next((n for n in block["steps"] if n.endswith("fused")), next(iter(block["steps"])))
    row = block["steps"][name]
    out = {"step": name, "compiled": block["compiled"], "ms": row["ms"]["median"], "images_per_s": row["images_per_s"],
           "achieved_tflops": row["achieved_tflops"], "mfu": row["mfu"],
           "mfu_vs_measured_ceiling": row.get("mfu_vs_measured_ceiling"), "peak_memory_gib": row["peak_memory_gib"],
           "attention_kernels": block.get("attention_kernels")}
    if block["compiled"]:
        out["compile_warmup_s"] = block["warmup_s"].get(name)
        out["compiled_vs_eager_frozen_logits"] = block.get("compiled_vs_eager_frozen_logits")
    mem = block.get("memory", {})
    if "trials_per_gpu" in mem:
        out.update(trials_per_gpu=mem["trials_per_gpu"]["trials"],
                   largest_batch=mem["largest_batch"]["verified_max_batch"],
                   predicted_largest_batch=mem["largest_batch"]["predicted_max_batch"],
                   eval_pgd_peak_gib=mem["eval_pgd_iteration_peak_gib"])
    if "profile" in block:
        out["profile_verdict"] = block["profile"]["verdict"]
    return out


def tapt(fp32: dict[str, Any] | None, bf16: dict[str, Any] | None) -> dict[str, Any] | None:
    rows = [dict(r, amp=False) for r in (fp32 or {}).get("results", [])]
    rows += [dict(r, amp=True) for r in (bf16 or {}).get("results", [])]
    if not rows:
        return None
    seq = [r for r in rows if r["mode"] == "one-by-one"]
    batched = [r for r in rows if r["mode"].startswith("batched")]
    best = min(batched, key=lambda r: r["ms_per_image"]) if batched else None
    return {"views": rows[0]["views"], "keep": rows[0]["keep"],
            "one_by_one_ms_per_image_fp32": seq[0]["ms_per_image"] if seq else None,
            "batched_ms_per_image": {f"{'bf16' if r['amp'] else 'fp32'} B={r['batch']}": r["ms_per_image"]
                                     for r in batched},
            "best_batched": None if best is None else {"ms_per_image": best["ms_per_image"], "batch": best["batch"],
                                                        "bf16": best["amp"]},
            "speedup_best_vs_one_by_one": (round(seq[0]["ms_per_image"] / best["ms_per_image"], 2)
                                           if seq and best else None)}


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0])
    stages = _load(Path(argv[1])) if len(argv) > 1 else {}
    env = _load(out_dir / "env.json")
    s = {"stages": stages or {}, "tests": tests(out_dir / "tests.xml"),
         "env": None if env is None else {"gpu": env["machine"].get("gpu"), "torch": env["machine"]["torch"],
                                          "python": env["machine"]["python"],
                                          "matmul_bf16_tflops": env["matmul_bf16_tflops_8192"]},
         "step_eager": step(_load(out_dir / "step.json")), "step_compiled": step(_load(out_dir / "compiled.json")),
         "tapt": tapt(_load(out_dir / "tapt_fp32.json"), _load(out_dir / "tapt_bf16.json"))}
    mfus = [x["mfu"] for x in (s["step_eager"], s["step_compiled"]) if x and x["mfu"] is not None]
    best_tapt = (s["tapt"] or {}).get("best_batched")
    s["goals"] = {"mfu_ge_35pct": None if not mfus else max(mfus) >= MFU_GOAL,
                  "tapt_lt_10ms_per_image": None if not best_tapt else best_tapt["ms_per_image"] < TAPT_GOAL_MS,
                  "tests_pass": None if not s["tests"] else not s["tests"]["failed"]}
    (out_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    _print(s)
    expected = {"env": "env.json", "tests": "tests.xml", "step": "step.json", "compiled": "compiled.json",
                "tapt": "tapt_bf16.json"}
    missing = [f for k, f in expected.items() if (stages or {}).get(k, {}).get("status") == "ok"
               and not (out_dir / f).is_file()]
    bad = [k for k, v in (stages or {}).items() if v["status"] != "ok"]
    if missing:
        print("missing outputs:", missing)
    return 1 if bad or missing or (s["tests"] and s["tests"]["failed"]) else 0


def _print(s: dict[str, Any]) -> None:
    print("\n== GPU check summary")
    for name, st in s["stages"].items():
        print(f"  stage {name:9s} {st['status']:8s} {st['seconds']:4d} s (limit {st['limit_s']} s)")
    if s["env"]:
        print(f"  {s['env']['gpu']}, torch {s['env']['torch']}, bf16 matmul {s['env']['matmul_bf16_tflops']} TFLOP/s")
    t = s["tests"]
    if t:
        print(f"  tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
              f"({t['seconds']:.0f} s)")
        for f in t["failed"]:
            print(f"    FAILED {f['test']}: {f['message'][:160]}")
    for key in ("step_eager", "step_compiled"):
        x = s[key]
        if x:
            mfu = "-" if x["mfu"] is None else f"{x['mfu']:.1%}"
            print(f"  {key}: {x['ms']:.2f} ms, {x['images_per_s']:.1f} img/s, {x['achieved_tflops']:.1f} TFLOP/s, "
                  f"MFU {mfu}, peak {x['peak_memory_gib']} GiB")
            for extra in ("trials_per_gpu", "largest_batch", "profile_verdict", "compile_warmup_s"):
                if extra in x:
                    print(f"    {extra}: {x[extra]}")
    if s["tapt"]:
        print(f"  tapt ({s['tapt']['views']} views): one-by-one {s['tapt']['one_by_one_ms_per_image_fp32']} ms/image; "
              f"batched {s['tapt']['batched_ms_per_image']}")
    print(f"  goals: {s['goals']}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
