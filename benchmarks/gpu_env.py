"""What the GPU check ran on: Python and package versions, the GPU, and its measured bf16 matmul ceiling.

Run (the ``env`` stage of benchmarks/gpu_check.sh; seconds):

    python benchmarks/gpu_env.py --device cuda --out /tmp/env.json

The ceiling (dense 8192^3 bf16 products on random data, ten after three warm-ups) is what MFU is also
quoted against, beside the issue's reference of 790 TFLOP/s (METHOD.md: datasheet rates are leads).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
from pathlib import Path

import torch
from common import machine, matmul_tflops  # puts the repo on sys.path

PACKAGES = ["torch", "torchvision", "open_clip_torch", "ftfy", "wcwidth", "torchattacks", "timm", "numpy",
            "huggingface_hub", "safetensors", "regex", "tqdm", "scipy", "pytest", "triton", "pyyaml", "pillow"]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    doc = {"machine": machine(device), "packages": versions(), "cuda_available": torch.cuda.is_available(),
           "matmul_bf16_tflops_8192": matmul_tflops(device),
           "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc["machine"].get(k) for k in ("gpu", "gpu_memory_gib", "torch", "python")}),
          "matmul bf16 TFLOP/s:", doc["matmul_bf16_tflops_8192"])
    missing = [k for k in ("torch", "open_clip_torch", "ftfy", "torchattacks") if doc["packages"][k] is None]
    if missing:
        print("missing:", missing)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
