"""The code on an accelerator: a CAPT step, each attack, TAPT batched vs one by one, bf16 autocast,
host-device syncs, CUDA vs CPU, peak memory, graph breaks.

Tests parametrized over ``device`` run their CPU half in the default suite (capt-tiny, seconds) and
their CUDA half only with ``-m gpu`` on a machine with CUDA (``benchmarks/gpu_check.sh`` does), with a
random-weight ViT-B/16 (open_clip builds it without downloading anything); tests that only make
sense on CUDA are gpu-marked alone. Nothing here fakes a GPU: without CUDA the gpu half is skipped.

Random weights have no accuracy to lose, so the attacks are judged against the model's own clean
predictions: agreement 1.0 before the attack, and it must fall. This module and conftest.py import
only what the GPU machine has plus the carried wheels (open_clip, ftfy, wcwidth, torchattacks);
``test_gpu_imports_need_nothing_the_device_lacks`` checks that.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pipeline.attacks import build_attack
from pipeline.config import load_config
from pipeline.prompts import FixedTextClassifier, PromptedCLIP
from pipeline.tapt import Tapt, TaptConfig, tune_sequential
from pipeline.tapt_stats import TaptStats, make_views, scaled_logits, token_shape, view_generators
from pipeline.train import OBJECTIVES, Step, autocast, build_model, make_train_attack

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


def _cfg(device: str, *extra: str):
    name, depth, batch = SETUP[device]
    return load_config(overrides=["method=capt", f"model.name={name}", f"prompt.depth={depth}",
                                  f"optim.batch_size={batch}", "attack.eps=4", *extra])


_MODELS: dict[tuple, PromptedCLIP] = {}


def _model(device: str, name: str | None = None, depth: int | None = None, pristine: bool = False) -> PromptedCLIP:
    """One PromptedCLIP per (device, model, depth), built as training builds it (seed 0), in train mode.
    ``pristine``: one that no test steps an optimiser on (results independent of the tests' order)."""
    key = (device, name or SETUP[device][0], depth or SETUP[device][1], pristine)
    if key not in _MODELS:
        torch.manual_seed(0)
        cfg = load_config(overrides=["method=capt", f"model.name={key[1]}", f"prompt.depth={key[2]}"])
        _MODELS[key] = build_model(cfg, CLASSES, TEMPLATES, torch.device(device))
    model = _MODELS[key]
    model.zero_grad(set_to_none=True)
    return model.train()


def _batch(model: PromptedCLIP, n: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    x = torch.rand(n, 3, size, size, generator=g)
    return x.to(device), torch.randint(0, len(CLASSES), (n,), generator=g).to(device)


def _step(model: PromptedCLIP, cfg, x, y, attack, amp: torch.dtype | None = None):
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


def _fixed(x_adv: torch.Tensor):
    """An "attack" that returns a given perturbation: compares steps on identical adversarial images."""
    return lambda classify, x, y: x_adv


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@contextlib.contextmanager
def _fp32_matmuls():
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
    """Host reads seen by :class:`HostReads`; on CUDA, also the synchronising CUDA calls that
    ``torch.cuda.set_sync_debug_mode('warn')`` reports (yielded as a dict, filled on exit)."""
    out: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        reads = stack.enter_context(HostReads())
        caught = stack.enter_context(warnings.catch_warnings(record=True)) if device == "cuda" else []
        if device == "cuda":
            warnings.simplefilter("always")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, "default")
        try:
            yield out
        finally:
            stack.close()
            out["host_reads"] = len(reads.reads)
            out["cuda_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
            out["reads"] = reads.reads  # type: ignore[assignment]


# ----------------------------------------------------------------------------- the training step


@pytest.mark.parametrize("device", DEVICES)
def test_capt_step_trains_the_prompts_only(device):
    """train_epoch's body (autocast as configured: bf16 on CUDA), PGD-2 attack: a real update."""
    cfg = _cfg(device)
    model = _model(device)
    x, y = _batch(model, cfg.optim.batch_size, device)
    before = {k: v.detach().clone() for k, v in model.prompts.named_parameters()}
    opt = torch.optim.SGD(list(model.prompts.parameters()), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    with autocast(cfg, torch.device(device)):
        step = Step(model, cfg, x, y, make_train_attack(cfg, model))
        loss, parts = OBJECTIVES["capt"](step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    assert loss.device.type == device and torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in parts.values()), parts
    assert step.logits("adv").dtype == torch.float32, "logits must stay float32 under autocast"
    x_adv = step.x_adv()
    eps = cfg.attack.eps_px
    assert float((x_adv - x).abs().max()) <= eps + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float((x_adv - x).abs().max()) > eps / 2, "the attack did not move the images"
    for k, p in model.prompts.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, k
        assert not torch.equal(p.detach(), before[k]), f"prompt {k} was not updated"
    assert all(p.grad is None for p in model.clip.parameters()), "a CLIP weight received a gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_agrees_with_fp32(device):
    """The same step (same adversarial images) under bf16 autocast and in fp32.

    Tolerances: bf16 keeps 8 significant bits (rounding error 2^-9 = 0.2% per product input), and a
    prompt gradient passes through every block twice (forward, backward); on CPU-bf16 the measured
    relative L2 error of the SGD update was 0.3-0.6% (capt-tiny) and 1.1-1.5% (ViT-B/16, batch 2),
    of the loss under 0.1%. Bounds: 5% for every update, 1% for the loss. A real dtype bug (a
    bf16 logit, a prompt cast that cuts the gradient, half-precision accumulation) gives 10% to 100%.
    The blocks must really run in bf16 (else the comparison proves nothing) and the logits in fp32.
    """
    cfg = _cfg(device)
    model = _model(device)
    n = 8 if device == "cpu" else cfg.optim.batch_size
    x, y = _batch(model, n, device, seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        x_adv = make_train_attack(cfg, model)(lambda z: model.logits(z, model.text_features()), x, y)
    dtypes: list[torch.dtype] = []
    hook = model.clip.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        ref = _step(model, cfg, x, y, _fixed(x_adv))
        assert set(dtypes) == {torch.float32}
        dtypes.clear()
        got = _step(model, cfg, x, y, _fixed(x_adv), amp=torch.bfloat16)
        assert set(dtypes) == {torch.bfloat16}, f"autocast did not reach the image tower: {dtypes}"
    finally:
        hook.remove()
    assert got[3].logits("adv").dtype == torch.float32 and got[3].logits("clean").dtype == torch.float32
    assert abs(float(got[0] - ref[0])) <= 0.01 * max(1.0, abs(float(ref[0]))), (float(got[0]), float(ref[0]))
    lr, wd = cfg.optim.lr, cfg.optim.weight_decay
    for k, p in model.prompts.named_parameters():  # the first SGD update: -lr * (grad + wd * p)
        upd_bf16, upd_fp32 = -lr * (got[2][k] + wd * p.detach()), -lr * (ref[2][k] + wd * p.detach())
        assert _rel(upd_bf16, upd_fp32) <= 0.05, (k, _rel(upd_bf16, upd_fp32))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_step_matches_cpu():
    """The same CAPT step (same weights, same adversarial images) on CUDA and on the CPU, fp32.

    Tolerance 1e-4 relative (loss, parts, prompt gradients, the attack's input gradient): with TF32
    off both sides compute in fp32 and differ only by summation order, ~1e-6 relative over 4 blocks.
    """
    cfg = _cfg("cpu")
    with _fp32_matmuls():
        out = {}
        for device in ("cpu", "cuda"):
            model = _model(device, "capt-tiny", 2, pristine=True)
            x, y = _batch(model, 8, device, seed=2)
            x_adv = (x + cfg.attack.eps_px * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
                     .sign().to(device)).clamp(0, 1)
            loss, parts, grads, _ = _step(model, cfg, x, y, _fixed(x_adv))
            with torch.no_grad():
                text = model.text_features()
            z = x.clone().requires_grad_(True)
            (g_in,) = torch.autograd.grad(F.cross_entropy(model.logits(z, text), y, reduction="sum"), z)
            out[device] = (loss, parts, grads, g_in)
        cpu, gpu = out["cpu"], [
            out["cuda"][0].cpu(), {k: v.cpu() for k, v in out["cuda"][1].items()},
            {k: v.cpu() for k, v in out["cuda"][2].items()}, out["cuda"][3].cpu()]
    assert abs(float(gpu[0] - cpu[0])) <= 1e-4 * max(1.0, abs(float(cpu[0])))
    for k in cpu[1]:
        assert abs(float(gpu[1][k] - cpu[1][k])) <= 1e-4 * max(1.0, abs(float(cpu[1][k]))), k
    for k in cpu[2]:
        assert _rel(gpu[2][k], cpu[2][k]) <= 1e-4, (k, _rel(gpu[2][k], cpu[2][k]))
    assert _rel(gpu[3], cpu[3]) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_peak_memory_vit_b16_batch32():
    """A CAPT PGD-2 bf16 step at ViT-B/16 batch 32 (fused clean + adversarial pass on 64 images).

    Expected ~4-5 GiB: 0.6 GiB fp32 weights + 0.3 GiB of their bf16 copies (autocast's cache) + the
    saved activations of the tuned pass on 2B = 64 images (measured on the CPU under bf16 autocast:
    about 50 MiB per image through 12 blocks, 3.2 GiB) + transients. The bound, 10 GiB, is twice
    that: a kept attack graph (+1.6 GiB per PGD iteration), fp32 activations (2x) or an
    attention that materialises its scores in fp32 (+1.7 GiB) would show.
    """
    cfg = _cfg("cuda")
    model = _model("cuda")
    x, y = _batch(model, 32, "cuda", seed=4)
    attack = make_train_attack(cfg, model)
    opt = torch.optim.SGD(list(model.prompts.parameters()), lr=cfg.optim.lr, momentum=cfg.optim.momentum)

    def step() -> None:
        with autocast(cfg, torch.device("cuda")):
            loss, _ = OBJECTIVES["capt"](Step(model, cfg, x, y, attack))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: kernels chosen, optimiser state made
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak memory, ViT-B/16 CAPT PGD-2 bf16 step, batch 32: {peak:.2f} GiB")
    assert peak < 10.0, f"{peak:.2f} GiB"


# ----------------------------------------------------------------------------- attacks


@pytest.fixture(scope="module")
def trained_on(trained_classifier):
    """conftest's tiny classifier with real accuracy (fine-tuned on toy colours, on the CPU), and a
    deep copy moved to CUDA AFTER construction (so every tensor the model keeps must follow .to())."""
    cache: dict[str, tuple] = {}

    def get(device: str):
        if device not in cache:
            model, x, y = trained_classifier
            moved = model if device == "cpu" else copy.deepcopy(model).to(device)
            cache[device] = (moved.eval(), x.to(device), y.to(device))
        return cache[device]
    return get


def _check_adversarial(model, adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert adv.device == x.device and adv.dtype == x.dtype and adv.shape == x.shape
    assert torch.isfinite(adv).all()
    assert float((adv - x).abs().max()) <= eps + 1e-6, "outside the eps-ball"
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1, "outside [0, 1]"
    assert all(p.grad is None for p in model.parameters()), "the attack leaked gradients"


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the best other one, per sample (negative: misclassified)."""
    return logits.gather(1, y[:, None])[:, 0] - logits.scatter(1, y[:, None], float("-inf")).amax(1)


# AutoAttack's CPU half is tests/test_attacks.py's (contract suite, strength ordering): slow on CPUs
ATTACKS_BY_DEVICE = [pytest.param("cpu", "pgd", id="cpu-pgd"), pytest.param("cpu", "cw", id="cpu-cw"),
                     *[pytest.param("cuda", w, id=f"cuda-{w}", marks=GPU) for w in ("pgd", "cw", "autoattack")]]


@pytest.mark.parametrize("device,which", ATTACKS_BY_DEVICE)
def test_attacks_reduce_accuracy(device, which, trained_on):
    """Evaluation attacks as evaluate.py builds them (fp32, seeded), eps 32/255, 16 toy images (8 for
    AutoAttack) of a model with clean accuracy 1.0. On the CPU the drop measured 1.0 -> 0.5 (PGD-10,
    CW-10) and -> 0.0 (AutoAttack); asserted: at least 0.25 lost, and AutoAttack at least as strong as PGD."""
    model, x, y = trained_on(device)
    n = 8 if which == "autoattack" else 16
    x, y = x[:n], y[:n]
    with torch.no_grad():
        clf = FixedTextClassifier(model, model.text_features())

        def acc(images: torch.Tensor) -> float:
            return float((clf(images).argmax(1) == y).float().mean())
    eps = 32 / 255
    clean = acc(x)
    assert clean >= 0.9, "a model worth attacking"
    adv = build_attack(which, eps=eps, steps=10, n_classes=len(model.classnames), module=model)(clf, x, y)
    _check_adversarial(model, adv, x, eps)
    robust = acc(adv)
    assert robust <= clean - 0.25, f"{which}: accuracy {clean:.2f} -> {robust:.2f}"
    if which == "autoattack":
        pgd = build_attack("pgd", eps=eps, steps=10, module=model)(clf, x, y)
        assert robust <= acc(pgd), "AutoAttack weaker than PGD-10"


@pytest.mark.parametrize("device,which", ATTACKS_BY_DEVICE)
def test_attacks_at_model_scale(device, which):
    """The same attacks on the step's model (ViT-B/16 on CUDA, random weights), eps 4/255, labels = the
    model's own clean predictions (random weights have no accuracy to lose): inside the ball, on the
    device, no gradient leak, and every sample's margin lowered (PGD, CW: they ascend it at every
    step; AutoAttack keeps the clean image where it fails, so there: never raised)."""
    model = _model(device, pristine=True).eval()
    n = 2 if which == "autoattack" else 8
    x, _ = _batch(model, n, device, seed=5)
    with torch.no_grad():
        clf = FixedTextClassifier(model, model.text_features())
        y = clf(x).argmax(1)
        before = _margin(clf(x), y)
    eps = 4 / 255
    adv = build_attack(which, eps=eps, steps=10, n_classes=len(CLASSES), module=model)(clf, x, y)
    _check_adversarial(model, adv, x, eps)
    with torch.no_grad():
        after = _margin(clf(adv), y)
    if which == "autoattack":
        assert (after <= before + 1e-4).all(), (before, after)
    else:
        assert (after < before).all(), (before, after)


@pytest.mark.parametrize("device", DEVICES)
def test_training_attack_loop_never_waits_for_the_host(device):
    """The training PGD (keep_best off) reads nothing back inside its loop; the whole attack call reads
    one flag (the [0, 1] range check); a whole CAPT step (forward, backward, SGD) adds nothing more.
    On CUDA ``set_sync_debug_mode('error')`` makes any synchronising call inside the loop raise."""
    cfg = _cfg(device, "attack.steps=3")
    model = _model(device)
    x, y = _batch(model, 8, device, seed=6)
    attack = make_train_attack(cfg, model)
    with torch.no_grad():
        text = model.text_features()

    def classify(z):
        return model.logits(z, text)

    with count_syncs(device) as loop:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        attack.perturb(classify, x, y)
    assert loop["host_reads"] == 0 and loop["cuda_syncs"] == 0, loop
    with count_syncs(device) as call:
        attack(classify, x, y)
    assert call["host_reads"] == 1, call
    assert call["cuda_syncs"] <= 1, call
    opt = torch.optim.SGD(list(model.prompts.parameters()), lr=1e-3, momentum=0.9)
    with count_syncs(device) as whole:
        with autocast(cfg, torch.device(device)):
            loss, _ = OBJECTIVES["capt"](Step(model, cfg, x, y, attack))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert whole["host_reads"] == 1 and whole["cuda_syncs"] <= 1, whole


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_pgd_reads_back_once_per_iteration(device):
    """Evaluation PGD's active set (fooled samples leave the batch) needs the survivor count each
    iteration: one host read per iteration, plus the range check and the final check."""
    model = _model(device).eval()
    x, _ = _batch(model, 8, device, seed=7)
    with torch.no_grad():
        clf = FixedTextClassifier(model, model.text_features())
        y = clf(x).argmax(1)
    steps = 6
    attack = build_attack("pgd", eps=1 / 255, steps=steps, module=model)  # small eps: most survive
    with count_syncs(device) as seen:
        attack(clf, x, y)
    assert seen["host_reads"] <= steps + 2, seen
    assert seen["cuda_syncs"] <= steps + 2, seen


# ----------------------------------------------------------------------------- TAPT


def _stats(model: PromptedCLIP) -> TaptStats:
    t, d = token_shape(model)
    g = torch.Generator().manual_seed(3)
    layers = tuple(range(min(8, model.n_vision_layers)))

    def mk(var: bool) -> list[torch.Tensor]:
        return [torch.rand(t, d, generator=g) if var else torch.randn(t, d, generator=g) for _ in layers]

    return TaptStats(layers, mk(False), mk(True), mk(False), mk(True), 10)


@pytest.mark.parametrize("device", DEVICES)
def test_tapt_batched_equals_one_by_one(device):
    """TAPT tuned 4 images at once == one at a time (the official loop), fp32, on the device.

    64 views keep 6 (ViT-B/16, 4 images; capt-tiny: 8 keep 2, 3 images). Tolerances as tests/test_tapt.py: logits 1e-4,
    prompts 1e-5 absolute (one AdamW step moves a prompt by ~lr = 5e-4). An image whose
    keep-th and next views' entropies are within 1e-5 is a float tie (the two paths may keep different
    views, both right) and is left out of the exact comparison; at most one may be.
    """
    model = _model(device).eval()
    views, tau, n = (64, 0.1, 4) if device == "cuda" else (8, 0.25, 3)
    cfg = TaptConfig(views=views, tau=tau)
    stats = _stats(model)
    x, _ = _batch(model, n, device, seed=8)
    idx = list(range(10, 10 + n))
    with _fp32_matmuls():
        batched = Tapt(model, stats, cfg)(x, idx)
        seq = tune_sequential(model, x, stats, cfg, idx)
        with torch.no_grad():
            v = make_views(x, cfg.views, view_generators(cfg.seed, idx))
            feats = model.image_features(v.flatten(0, 1)).view(len(x), cfg.views, -1)
            logits = scaled_logits(model, feats, model.text_features())
    logp = F.log_softmax(logits.float(), dim=-1)
    ent = (-(logp.exp() * logp).sum(-1)).sort(dim=-1).values
    clear = (ent[:, cfg.keep] - ent[:, cfg.keep - 1]) > 1e-5
    assert int(clear.sum()) >= len(x) - 1, ent[:, cfg.keep - 1:cfg.keep + 1]
    torch.testing.assert_close(batched.logits[clear], seq.logits[clear], rtol=0, atol=1e-4)
    assert batched.prompts.keys() == seq.prompts.keys() and batched.prompts
    for k in batched.prompts:
        torch.testing.assert_close(batched.prompts[k][clear], seq.prompts[k][clear], rtol=0, atol=1e-5)
    assert batched.logits.device.type == device


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_blocks_compile_without_graph_breaks(device):
    """benchmarks/bench_step.py compiles each transformer block (regional compilation): every block
    of both towers must trace as one graph, in the modes the step uses (train with grad, eval without)."""
    import torch._dynamo as dynamo

    model = _model(device)
    visual, text = model.clip.visual.transformer.resblocks[0], model.text_tower.blocks[0]
    tv, dv = token_shape(model)
    xv = torch.randn(2, tv, dv, device=device, requires_grad=True)
    lt = model.tok_prefix.shape[1] + model.cfg.n_ctx_text + model.tok_suffix.shape[1]
    xt = torch.randn(3, lt, model.text_tower.width, device=device, requires_grad=True)
    mask = model.text_tower.attn_mask[:lt, :lt]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for blk, args, kwargs in ((visual, (xv,), {}), (text, (xt,), {"attn_mask": mask})):
                blk.train(grad)
                dynamo.reset()
                report = dynamo.explain(blk)(*args, **kwargs)
                assert report.graph_break_count == 0 and report.graph_count == 1, report.break_reasons
    dynamo.reset()


# ----------------------------------------------------------------------------- the benchmarks' memory arithmetic


def test_largest_batch_fit_and_trials_per_gpu():
    """bench_step.py's memory figures (run on CUDA only) from a fake step: 2 GiB fixed + 0.25 GiB per image,
    out of memory above 20 GiB. The linear fit predicts (0.9 * 20 - 2) / 0.25 = 64; the first try at
    64 fits. With a peak that grows faster than the fit says, it backs off by 10% per out-of-memory."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import fit_batch, trials_per_gpu

    gib = 2**30
    calls: list[int] = []

    def peak_at(batch: int, extra: float = 0.0) -> int:
        calls.append(batch)
        need = int((2 + 0.25 * batch + extra * max(0, batch - 40)) * gib)
        if need > 20 * gib:
            raise torch.OutOfMemoryError("fake")
        return need

    out = fit_batch(peak_at, 20 * gib, sizes=(8, 16))
    assert out["predicted_max_batch"] == 64 and out["verified_max_batch"] == 64 and calls == [8, 16, 64]
    assert out["gib_per_image"] == 0.25 and out["fixed_gib"] == 2.0
    calls.clear()
    out = fit_batch(lambda b: peak_at(b, extra=0.4), 20 * gib, sizes=(8, 16))  # nonlinear above 40
    assert calls == [8, 16, 64, 57, 51] and out["verified_max_batch"] == 51
    assert [a["result"] for a in out["attempts"]] == ["out of memory", "out of memory", "ok"]
    t = trials_per_gpu(total=140 * gib, trial_reserved=6 * gib, context=gib)
    assert t["trials"] == 19 and t["per_trial_gib"] == 7.0  # floor(0.95 * 140 / 7)


# ----------------------------------------------------------------------------- the device's packages


def test_gpu_imports_need_nothing_the_device_lacks():
    """Importing conftest, this module and the GPU benchmarks must work where ray, mlflow, optuna,
    webdataset and braceexpand are missing (the GPU machine); their import is blocked here."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_DEVICE!r}:
            raise ImportError("not on the GPU machine: " + name)
        return None
sys.meta_path.insert(0, Block())
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "benchmarks")!r}]
import tests.conftest, tests.test_gpu, bench_step, bench_tapt, common
import pipeline.train, pipeline.tapt, pipeline.evaluate, pipeline.attacks
print(sorted(m for m in sys.modules if m.split(".")[0] in {ABSENT_ON_DEVICE!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
