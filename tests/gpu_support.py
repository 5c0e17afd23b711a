"""Helpers of the GPU tests (tests/test_gpu.py, tests/test_gpu_attacks.py): devices, models, one step,
and the host-read / CUDA-sync counter.

Tests parametrized over ``DEVICES`` run their CPU half in the default suite (capt-tiny, seconds) and
their CUDA half only with ``-m gpu`` on a machine with CUDA (``benchmarks/gpu_check.sh`` does), with a
random-weight ViT-B/16 (open_clip builds it without downloading anything). Without CUDA the CUDA half
is skipped, never faked. These modules import only what the GPU machine has plus the carried wheels
(open_clip, ftfy, wcwidth, torchattacks); ``test_gpu_imports_need_nothing_the_device_lacks`` checks it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline.config import load_config
from pipeline.prompts import PromptedCLIP
from pipeline.train import OBJECTIVES, Step, build_model

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU)]
# per device: the model, the prompt depth (CAPT's 9 on ViT-B/16) and the batch of the step tests
SETUP = {"cpu": ("capt-tiny", 2, 8), "cuda": ("ViT-B-16", 9, 32)}
CLASSES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray",
           "stingray", "cock", "hen", "ostrich"]
TEMPLATES = ["a photo of a {}."]
# what the GPU machine lacks and no wheel brings (benchmarks/gpu_wheels.sh): importing any is a bug
ABSENT_ON_DEVICE = ("ray", "mlflow", "optuna", "webdataset", "braceexpand")


def cfg_for(device: str, *extra: str):
    name, depth, batch = SETUP[device]
    return load_config(overrides=["method=capt", f"model.name={name}", f"prompt.depth={depth}",
                                  f"optim.batch_size={batch}", "attack.eps=4", *extra])


MODELS: dict[tuple, PromptedCLIP] = {}


def model_on(device: str, name: str | None = None, depth: int | None = None, pristine: bool = False) -> PromptedCLIP:
    """One PromptedCLIP per (device, model, depth), built as training builds it (seed 0), in train mode.
    ``pristine``: one that no test steps an optimiser on (results independent of the tests' order)."""
    key = (device, name or SETUP[device][0], depth or SETUP[device][1], pristine)
    if key not in MODELS:
        torch.manual_seed(0)
        cfg = load_config(overrides=["method=capt", f"model.name={key[1]}", f"prompt.depth={key[2]}"])
        MODELS[key] = build_model(cfg, CLASSES, TEMPLATES, torch.device(device))
    model = MODELS[key]
    model.zero_grad(set_to_none=True)
    return model.train()


def batch_on(model: PromptedCLIP, n: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    x = torch.rand(n, 3, size, size, generator=g)
    return x.to(device), torch.randint(0, len(CLASSES), (n,), generator=g).to(device)


def one_step(model: PromptedCLIP, cfg, x, y, attack, amp: torch.dtype | None = None):
    """One CAPT step's loss (with ``.backward()`` done), its parts and the prompt gradients."""
    model.zero_grad(set_to_none=True)
    model.train()
    ctx = torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        step = Step(model, cfg, x, y, attack)
        loss, parts = OBJECTIVES[cfg.loss.objective](step)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.prompts.named_parameters()}
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, grads, step


def fixed_attack(x_adv: torch.Tensor):
    """An "attack" that returns a given perturbation: compares steps on identical adversarial images."""
    return lambda classify, x, y: x_adv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@contextlib.contextmanager
def fp32_matmuls():
    """TF32 off (cuDNN convolutions use it by default on Ampere and later): CUDA and CPU both in fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------- host reads / syncs


class HostReads(TorchFunctionMode):
    """Counts the Python-level tensor operations that read tensor data on the host.

    On CUDA each is a host-device synchronisation; on the CPU this is the same code's proxy for
    them (``torch.cuda.set_sync_debug_mode`` is the CUDA ground truth, used beside it there).
    """

    NAMES = {"item", "__bool__", "tolist", "__int__", "__float__", "__index__", "__complex__", "nonzero", "argwhere",
             "masked_select", "unique", "unique_consecutive"}
    TO_HOST = {"cpu", "numpy", "to"}  # reads only when they copy a device tensor to the host

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
        masks = index if isinstance(index, tuple) else (index,)
        on_device = bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"
        to_host = name in ("cpu", "numpy") or any(isinstance(a, str | torch.device) and str(a).startswith("cpu")
                                                  for a in [*args[1:], *kwargs.values()])
        if (name in self.NAMES or any(isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in masks)
                or (name in self.TO_HOST and on_device and to_host) or (name == "where" and len(args) == 1)):
            self.reads.append(name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs(device: str):
    """Host-device synchronisations of the body, yielded as a dict filled on exit (``syncs``, ``what``).

    CUDA: the synchronising calls that ``torch.cuda.set_sync_debug_mode('warn')`` reports (the ground
    truth; :class:`HostReads` stays off there, since a torch-function mode sends nn.MultiheadAttention
    down its slow path and would hide its fast path's syncs). CPU: :class:`HostReads`'s proxy.
    """
    out: dict = {"syncs": 0, "what": []}
    if device == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield out
            finally:
                torch.cuda.set_sync_debug_mode("default")
        hits = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]
        out.update(syncs=len(hits), what=hits[:5])
    else:
        with HostReads() as reads:
            yield out
        out.update(syncs=len(reads.reads), what=reads.reads)
