"""Helpers shared by the benchmarks: machine description, timing, statistics, class names, records.

Timing rules used by the benchmarks here:

* measurements are taken in *rounds*; each round times every variant once (interleaved), so a slow
  drift of a shared machine's load hits all variants alike; ratios are computed per round and the
  median over rounds is reported with its spread (min, max);
* on CPU the clock is the process's CPU time (``time.process_time``) with one torch thread: on a
  machine shared with other jobs, wall time also counts the time spent waiting for a core, which is
  not a property of the code; on CUDA it is wall time around ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
_LOAD_AT_START = os.getloadavg()  # when the benchmark started (this module is imported first)
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def machine(device: torch.device) -> dict[str, Any]:
    """Where a figure was measured: CPU model and cores, load, library versions, GPU name."""
    cpu = _lscpu()
    info = {"cpu_model": cpu.get("Model name", platform.processor()), "cpu_cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(v, 2) for v in _LOAD_AT_START]}
    try:
        import open_clip
        info["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    info.update(gpu_info(device))
    return info


def gpu_info(device: torch.device) -> dict[str, Any]:
    """The GPU's name, memory, compute capability, multiprocessors, CUDA version and, where
    nvidia-smi answers, driver and clocks (empty off CUDA)."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    _, total = torch.cuda.mem_get_info(device)
    info: dict[str, Any] = {"gpu": props.name, "gpu_memory_gib": round(total / 2**30, 2),
                            "compute_capability": f"{props.major}.{props.minor}",
                            "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}
    query = "driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"
    try:
        text = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        if text:
            info["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in text[0].split(",")), strict=False))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """CPU time of the process on CPU, wall time on CUDA (see the module docstring)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def clock_name(device: torch.device) -> str:
    return "wall time (synchronized)" if device.type == "cuda" else "process CPU time, 1 torch thread"


def time_call(fn: Callable[[], Any], device: torch.device, inner: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    now = clock(device)
    sync(device)
    start = now()
    for _ in range(inner):
        fn()
    sync(device)
    return (now() - start) / inner


def calibrate(fn: Callable[[], Any], device: torch.device, min_seconds: float) -> int:
    """How many back-to-back calls make one measurement last at least ``min_seconds`` (after a warm-up)."""
    fn()
    once = time_call(fn, device)
    return max(1, int(min_seconds / max(once, 1e-6) + 0.999))


def rounds(fns: dict[str, Callable[[], Any]], device: torch.device, n_rounds: int,
           min_seconds: float = 0.2, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each function, ``n_rounds`` interleaved rounds (one value per round).

    ``min_seconds`` > 0: each value averages enough back-to-back calls to last that long (after a
    warm-up call); 0: one call per value (long calls), with a warm-up call first when ``warmup``.
    """
    inner = {}
    for k, f in fns.items():
        if min_seconds > 0:
            inner[k] = calibrate(f, device, min_seconds)
        else:
            if warmup:
                f()
            inner[k] = 1
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n_rounds):
        for k, f in fns.items():
            out[k].append(time_call(f, device, inner[k]))
    return out


def summary(values: list[float], digits: int = 4) -> dict[str, Any]:
    """Median with the spread of the rounds (min, max, and max-min relative to the median)."""
    med = statistics.median(values)
    return {"median": round(med, digits), "min": round(min(values), digits), "max": round(max(values), digits),
            "spread_pct": round(100 * (max(values) - min(values)) / med, 1) if med else 0.0,
            "n": len(values)}


def record(args_out: Path, device: torch.device, setup: dict[str, Any], results: Any,
           notes: list[str] | None = None) -> dict[str, Any]:
    """Write the JSON record (command, machine, date, setup, results) and return it."""
    rec = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine(device),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "setup": setup, "results": results}
    rec["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    if notes:
        rec["notes"] = notes
    args_out.parent.mkdir(parents=True, exist_ok=True)
    args_out.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


# ----------------------------------------------------------------------------- class names

_MODIFIERS = ["great white", "African grey", "red-eyed tree", "American black", "three-toed", "long-haired",
              "common", "spotted", "Siberian", "giant", "wire-haired", "Egyptian", "European", "snow-capped",
              "golden", "striped", "soft-coated wheaten", "broad-tailed", "Mexican hairless", "Greater Swiss mountain"]
_HEADS = ["shark", "frog", "owl", "sloth", "retriever", "terrier", "beetle", "butterfly", "snake", "lizard",
          "turtle", "salamander", "spider", "crab", "lobster", "heron", "eagle", "parrot", "woodpecker",
          "hummingbird", "monkey", "lemur", "squirrel", "fox", "wolf", "bear", "antelope", "goat", "sheep",
          "whale", "dolphin", "seal", "mushroom", "orchid", "daisy", "cactus", "pickup truck", "school bus",
          "sports car", "fireboat", "airliner", "mountain bike", "acoustic guitar", "grand piano",
          "cuckoo clock", "table lamp", "rocking chair", "dining table", "teapot", "umbrella"]


def class_names(n: int) -> list[str]:
    """``n`` distinct ImageNet-like class names ("great white shark", "Mexican hairless grand piano":
    2 to 5 words, up to 8 BPE tokens), made here; the first 100 already use every modifier; at most 1000."""
    m, h = len(_MODIFIERS), len(_HEADS)
    names = [f"{_MODIFIERS[i % m]} {_HEADS[(i // m) * 7 % h]}" for i in range(m * h)]  # 7 is prime to 50
    if n > len(names):
        raise ValueError(f"at most {len(names)} class names, asked for {n}")
    return names[:n]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


# ----------------------------------------------------------------------------- step figures

def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def attention_kernels(fn) -> list[str]:
    """The attention operators one call runs (which scaled-dot-product backend torch picked)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if n.startswith("aten::") and ("scaled_dot_product" in n or "attention" in n))


def peak_memory(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


# ----------------------------------------------------------------------------- GPU figures


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """Measured dense bf16 matrix-product rate on random data (TFLOP/s): the ceiling that model FLOP
    utilisation is also quoted against (METHOD.md: measure the ceiling, datasheets are leads)."""
    if device.type != "cuda":
        return None
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return round(2 * n**3 * reps / (start.elapsed_time(end) / 1000) / 1e12, 1)


_KERNEL_KINDS = [("matmul", r"gemm|cutlass|xmma|wgmma|sm90_|cublas|matmul|addmm|\bmm\b|linear"),
                 ("attention", r"flash|fmha|attention|sdpa|softmax"),
                 ("norm", r"layer_?norm|LayerNorm|rms_?norm"),
                 ("copy", r"copy|memcpy|memset|cat|Memcpy|Memset"),
                 ("elementwise", r"elementwise|vectorized|reduce|unrolled|foreach|pointwise|triton")]


def _kind(name: str) -> str:
    return next((k for k, pat in _KERNEL_KINDS if re.search(pat, name, re.IGNORECASE)), "other")


def profile_summary(fn: Callable[[], Any], device: torch.device, calls: int = 3, top: int = 12) -> dict[str, Any]:
    """Where ``fn``'s time goes (torch.profiler over ``calls`` calls after a warm-up).

    CUDA: the fraction of wall time the GPU runs kernels (low = the host and kernel launches limit the
    step), kernel launches per call, time by kernel kind (matmul, attention, norm, copy, elementwise,
    other) and the top kernels. CPU: the top operators by self time. Ends with a one-line verdict.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    out: dict[str, Any] = {"calls": calls, "wall_ms_per_call": round(wall_us / calls / 1000, 3)}
    if cuda:
        kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy = sum(t for _, t in kernels)
        by_name: dict[str, float] = {}
        by_kind: dict[str, float] = {}
        for name, t in kernels:
            by_name[name] = by_name.get(name, 0.0) + t
            by_kind[_kind(name)] = by_kind.get(_kind(name), 0.0) + t
        out.update(gpu_busy_fraction=round(busy / wall_us, 3), kernel_launches_per_call=round(len(kernels) / calls, 1),
                   kernel_ms_per_call=round(busy / calls / 1000, 3),
                   kernel_share_by_kind={k: round(v / max(busy, 1e-9), 3) for k, v in
                                         sorted(by_kind.items(), key=lambda kv: -kv[1])},
                   top_kernels=[{"name": n[:120], "ms_per_call": round(t / calls / 1000, 3),
                                 "share": round(t / max(busy, 1e-9), 3)}
                                for n, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]])
        idle = 1 - out["gpu_busy_fraction"]
        share = out["kernel_share_by_kind"]
        if idle > 0.3:
            verdict = (f"host-bound: the GPU idles {idle:.0%} of the step between "
                       f"{out['kernel_launches_per_call']:.0f} kernel launches (Python, autograd, launch latency)")
        elif share.get("matmul", 0) < 0.5:
            verdict = f"non-matmul kernels take {1 - share.get('matmul', 0):.0%} of the GPU time"
        else:
            verdict = "matmul-bound: the matrix kernels themselves run below the ceiling (shapes too small?)"
        out["verdict"] = verdict
    else:
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        out["top_cpu_ops"] = [{"name": e.key[:120], "self_ms_per_call": round(e.self_cpu_time_total / calls / 1000, 3),
                               "count_per_call": round(e.count / calls, 1)} for e in rows]
        out["verdict"] = "CPU: no device kernels to attribute (dry run)"
    return out


def fit_batch(peak_at: Callable[[int], int], capacity: int, sizes: tuple[int, int] = (32, 64),
              headroom: float = 0.9, tries: int = 3) -> dict[str, Any]:
    """The largest batch whose step fits in ``capacity`` bytes.

    ``peak_at(b)`` runs one step at batch ``b`` and returns its peak bytes (raising
    ``torch.OutOfMemoryError`` when it does not fit). The peak at two sizes gives the linear model
    ``a + b * B``; the largest B under ``headroom * capacity`` is then run for real, 10% smaller after
    each out-of-memory, ``tries`` times at most.
    """
    b1, b2 = sizes
    p1, p2 = peak_at(b1), peak_at(b2)
    per = (p2 - p1) / (b2 - b1)
    fixed = p1 - per * b1
    predicted = int((headroom * capacity - fixed) / per) if per > 0 else None
    out: dict[str, Any] = {"peak_gib": {str(b1): round(p1 / 2**30, 3), str(b2): round(p2 / 2**30, 3)},
                           "gib_per_image": round(per / 2**30, 4), "fixed_gib": round(fixed / 2**30, 3),
                           "capacity_gib": round(capacity / 2**30, 2), "headroom": headroom,
                           "predicted_max_batch": predicted, "verified_max_batch": None, "attempts": []}
    batch = predicted
    for _ in range(tries if predicted else 0):
        try:
            peak = peak_at(batch)
        except torch.OutOfMemoryError:
            out["attempts"].append({"batch": batch, "result": "out of memory"})
            batch = int(batch * 0.9)
            continue
        out["attempts"].append({"batch": batch, "result": "ok", "peak_gib": round(peak / 2**30, 3)})
        out["verified_max_batch"] = batch
        break
    return out


def trials_per_gpu(total: int, trial_reserved: int, context: int, share: float = 0.95) -> dict[str, Any]:
    """How many trials of this memory fit on one GPU at once (``search.resources.gpu = 1 / n``): each
    trial is its own process with its own CUDA context and allocator cache; ``share`` of the memory is
    usable. Memory only: fractional GPUs isolate neither memory nor compute (they share the SMs)."""
    per = trial_reserved + context
    return {"trials": int(share * total // per) if per else None, "per_trial_gib": round(per / 2**30, 3),
            "reserved_gib": round(trial_reserved / 2**30, 3), "cuda_context_gib": round(context / 2**30, 3),
            "gpu_memory_gib": round(total / 2**30, 2), "usable_share": share}
