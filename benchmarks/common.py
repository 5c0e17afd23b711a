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
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
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
