"""The training step on an accelerator: CAPT step, bf16 vs fp32, CUDA vs CPU, peak memory, compile graph
breaks; the benchmarks' memory arithmetic; and that all GPU tests import nothing the GPU machine lacks.

See tests/gpu_support.py for how the device halves run; the attacks and TAPT are in tests/test_gpu_attacks.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.tapt_stats import token_shape
from pipeline.train import OBJECTIVES, Step, autocast, make_train_attack

from .gpu_support import (
    ABSENT_ON_DEVICE,
    CUDA,
    DEVICES,
    ROOT,
    batch_on,
    cfg_for,
    fixed_attack,
    fp32_matmuls,
    model_on,
    one_step,
    rel_err,
)

# ----------------------------------------------------------------------------- the training step


@pytest.mark.parametrize("device", DEVICES)
def test_capt_step_trains_the_prompts_only(device):
    """train_epoch's body (autocast as configured: bf16 on CUDA), PGD-2 attack: a real update."""
    cfg = cfg_for(device)
    model = model_on(device)
    x, y = batch_on(model, cfg.optim.batch_size, device)
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

    bf16 keeps 8 significant bits (rounding 2^-9 = 0.2% per operand); a prompt's gradient is a sum
    over every block, forward and backward, with cancellation (random weights: nearly uniform
    predictions). Measured on the CPU's bf16 autocast (same autocast rules for matmuls): relative L2
    error of the first SGD update 2.3-5.6% (capt-tiny, 3 seeds), 1.6-2.6% (ViT-B/16, batch 2); of the
    loss 0.03-0.4% and 0.08%. Bounds, ~3x the worst: 15% per update with cosine >= 0.99, 2% for the
    loss; what they catch is a gross error (a gradient path cut by a cast, a wrong scale, NaN). The
    blocks must really run in bf16 (else the comparison proves nothing) and the logits in fp32.
    """
    cfg = cfg_for(device)
    model = model_on(device)
    n = 8 if device == "cpu" else cfg.optim.batch_size
    x, y = batch_on(model, n, device, seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        x_adv = make_train_attack(cfg, model)(lambda z: model.logits(z, model.text_features()), x, y)
    dtypes: list[torch.dtype] = []
    hook = model.clip.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        ref = one_step(model, cfg, x, y, fixed_attack(x_adv))
        assert set(dtypes) == {torch.float32}
        dtypes.clear()
        got = one_step(model, cfg, x, y, fixed_attack(x_adv), amp=torch.bfloat16)
        assert set(dtypes) == {torch.bfloat16}, f"autocast did not reach the image tower: {dtypes}"
    finally:
        hook.remove()
    assert got[3].logits("adv").dtype == torch.float32 and got[3].logits("clean").dtype == torch.float32
    assert abs(float(got[0] - ref[0])) <= 0.02 * max(1.0, abs(float(ref[0]))), (float(got[0]), float(ref[0]))
    lr, wd = cfg.optim.lr, cfg.optim.weight_decay
    for k, p in model.prompts.named_parameters():  # the first SGD update: -lr * (grad + wd * p)
        upd_bf16, upd_fp32 = -lr * (got[2][k] + wd * p.detach()), -lr * (ref[2][k] + wd * p.detach())
        cos = float(F.cosine_similarity(upd_bf16.flatten().double(), upd_fp32.flatten().double(), dim=0))
        assert rel_err(upd_bf16, upd_fp32) <= 0.15 and cos >= 0.99, (k, rel_err(upd_bf16, upd_fp32), cos)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_step_matches_cpu():
    """The same CAPT step (same weights, same adversarial images) on CUDA and on the CPU, fp32.

    Tolerance 1e-4 relative (loss, parts, prompt gradients, the attack's input gradient): with TF32
    off both sides compute in fp32 and differ only by summation order, ~1e-6 relative over 4 blocks.
    """
    cfg = cfg_for("cpu")
    with fp32_matmuls():
        out = {}
        for device in ("cpu", "cuda"):
            model = model_on(device, "capt-tiny", 2, pristine=True)
            x, y = batch_on(model, 8, device, seed=2)
            x_adv = (x + cfg.attack.eps_px * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
                     .sign().to(device)).clamp(0, 1)
            loss, parts, grads, _ = one_step(model, cfg, x, y, fixed_attack(x_adv))
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
        assert rel_err(gpu[2][k], cpu[2][k]) <= 1e-4, (k, rel_err(gpu[2][k], cpu[2][k]))
    assert rel_err(gpu[3], cpu[3]) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_peak_memory_vit_b16_batch32():
    """A CAPT PGD-2 bf16 step at ViT-B/16 batch 32 (fused clean + adversarial pass on 64 images).

    Expected 2.5-4 GiB: 0.6 GiB of fp32 weights; the tuned pass's saved activations, measured on the
    CPU under bf16 autocast at 36 MiB per image (with the attention probabilities that the CPU's
    math kernel keeps and flash attention does not: ~13 MiB without them), 0.8-2.3 GiB for 64
    images; the attack's and the frozen pass's transients, under 1 GiB. Bound: 8 GiB, twice the
    upper estimate, for gross regressions (the step in fp32 with materialised attention scores,
    graphs kept across PGD iterations at scale); the figure this prints tightens it after the first run.
    """
    cfg = cfg_for("cuda")
    model = model_on("cuda")
    x, y = batch_on(model, 32, "cuda", seed=4)
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
    assert peak < 8.0, f"{peak:.2f} GiB"


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_blocks_compile_without_graph_breaks(device):
    """benchmarks/bench_step.py compiles each transformer block (regional compilation): every block
    of both towers must trace as one graph, in the modes the step uses (train with grad, eval without)."""
    import torch._dynamo as dynamo

    model = model_on(device)
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
import tests.conftest, tests.test_gpu, tests.test_gpu_attacks, bench_step, bench_tapt, common, gpu_env, gpu_summary
import pipeline.train, pipeline.tapt, pipeline.evaluate, pipeline.attacks
print(sorted(m for m in sys.modules if m.split(".")[0] in {ABSENT_ON_DEVICE!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
