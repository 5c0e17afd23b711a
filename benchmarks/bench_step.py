"""Training-step efficiency: one CAPT / ce_adv step's time divided by the ideal sum of its passes.

Run (CPU, 1 torch thread; capt-small, batch 32, 100 classes, K = 2 and 3; a few minutes):

    python benchmarks/bench_step.py --model capt-small --batch 32 \\
        --out benchmarks/results/bench_step_capt-small.json
    python benchmarks/bench_step.py --model ViT-B-32 --batch 8 --rounds 3 \\
        --out benchmarks/results/bench_step_vit-b-32.json

GPU (bf16 autocast; images/s, model FLOP utilisation against --peak-tflops and against the bf16
matmul ceiling measured in the run, peak memory, the scaled-dot-product-attention kernels in use;
``--max-batch``: memory of the step and of an evaluation PGD iteration, CUDA context, trials per GPU,
the largest batch (fitted at --fit-sizes, then run); ``--profile-below 0.35``: a torch.profiler
summary of the step when its MFU is below 35%; benchmarks/gpu_check.sh runs these, ~2.5 min):

    python benchmarks/bench_step.py --model ViT-B-16 --device cuda --amp --batch 32 --steps 2 \\
        --objectives capt --peak-tflops 790 --profile-below 0.35 --max-batch \\
        --out benchmarks/results/bench_step_cuda.json
    python benchmarks/bench_step.py --model ViT-B-16 --device cuda --amp --batch 32 --steps 2 \\
        --objectives capt --peak-tflops 790 --compile on --no-components --fused-only \\
        --out benchmarks/results/bench_step_cuda_compiled.json

Timed, each alone with the step's shapes and modes, in interleaved rounds (see common.py):

* ``step``: exactly ``train_epoch``'s body: Step + objective + zero_grad + backward + SGD step;
  ``fused`` (the default path) and ``separate`` (``Step(fuse=False)``: two tuned image passes);
* ``attack``: one PGD iteration: tuned image tower forward + backward to the input (eval mode,
  parameters frozen, as under ``attack_mode``);
* ``train B`` / ``train 2B``: tuned image tower forward + backward to the prompts on B / 2B images;
* ``text``: tuned text tower forward + backward to the prompts, C classes, trimmed context;
* ``frozen``: frozen image tower forward, no grad, eval mode.

Ideal (issue) = K attack + train B + text (+ frozen when the objective uses the frozen guide), i.e.
(K + 1) image passes. Ideal (honest) = the same with train 2B when the objective needs the tuned
model with gradient on the clean AND the adversarial images (CAPT's KL(f(x_adv) || f(x)), FAP): that
pass exists in the method, it is not overhead. ce_adv (APT / AdvVLP) needs neither the clean pass nor
the frozen guide, so its two ideals coincide.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from common import (  # puts the repo on sys.path
    attention_kernels,
    calibrate,
    class_names,
    clock_name,
    count_flops,
    fit_batch,
    matmul_tflops,
    peak_memory,
    profile_summary,
    record,
    rounds,
    summary,
    time_call,
    trials_per_gpu,
)

from pipeline.attacks import attack_mode, build_attack, project_linf
from pipeline.clip import register_model_configs
from pipeline.config import Config, load_config
from pipeline.prompts import PromptedCLIP
from pipeline.train import OBJECTIVES, Step, autocast, build_model, make_train_attack

log = logging.getLogger("bench_step")
METHOD = {"capt": "capt", "ce_adv": "advvlp"}  # the same ivlp prompts; they differ by objective only
PAIRED = {"capt", "fap"}  # objectives with a tuned pass on clean and adversarial images
FROZEN = {"capt"}  # objectives that use the frozen guide
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}  # bf16 dense


def make_cfg(args: argparse.Namespace, objective: str, k: int, depth: int) -> Config:
    return load_config(overrides=[f"method={METHOD[objective]}", f"model.name={args.model}", f"attack.steps={k}",
                                  f"prompt.depth={depth}", f"optim.amp={str(args.amp).lower()}", "optim.lr=0.000001"])


def compile_blocks(model: PromptedCLIP) -> None:
    """Regional compilation: every transformer block of both towers (the step's own Python glue,
    prompt concatenation and the attack loop, stays eager)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # many blocks x a few shapes
        if hasattr(cfg, name):
            setattr(cfg, name, 64)
    for blk in [*model.clip.visual.transformer.resblocks, *model.text_tower.blocks]:
        blk.compile()


def components(model: PromptedCLIP, cfg: Config, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict:
    """The ideal step's passes, each as a callable."""
    with torch.no_grad():
        text = model.text_features()
    g_text = torch.randn_like(text)
    x2 = torch.cat([x, (x + 0.01 * torch.randn_like(x)).clamp(0, 1)])
    y2 = torch.cat([y, y])

    def attack() -> None:
        with attack_mode(model), autocast(cfg, device), torch.enable_grad():
            z = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(model.logits(z, text).float(), y, reduction="sum")
            torch.autograd.grad(loss, z)

    def train_pass(xs: torch.Tensor, ys: torch.Tensor):
        def run() -> None:
            with autocast(cfg, device):
                loss = F.cross_entropy(model.logits(xs, text).float(), ys)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    def text_pass() -> None:
        with autocast(cfg, device):
            feats = model.text_features()
        (feats * g_text).sum().backward()
        model.zero_grad(set_to_none=True)

    def frozen() -> None:
        model.clip.eval()
        with torch.no_grad(), autocast(cfg, device):
            model.frozen_logits(x)
        model.clip.train()

    return {"attack": attack, "train B": train_pass(x, y), "train 2B": train_pass(x2, y2), "text": text_pass,
            "frozen": frozen}


def step_fn(model: PromptedCLIP, cfg: Config, x: torch.Tensor, y: torch.Tensor, device: torch.device, fuse: bool):
    """``train_epoch``'s body for one batch."""
    attack = make_train_attack(cfg, model)
    objective = OBJECTIVES[cfg.loss.objective]
    opt = torch.optim.SGD([p for p in model.prompts.parameters()], lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)

    def run() -> None:
        with autocast(cfg, device):
            loss, _ = objective(Step(model, cfg, x, y, attack, fuse=fuse))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def step_variants(args, model, depth, x, y, device) -> dict[str, tuple[str, int, bool, object]]:
    out = {}
    for objective in args.objectives:
        for k in args.steps:
            cfg = make_cfg(args, objective, k, depth)
            for fuse in ([True, False] if objective in PAIRED and not args.fused_only else [True]):
                name = f"step {objective} K={k}" + ("" if objective not in PAIRED else " fused" if fuse else " separate")
                out[name] = (objective, k, fuse, step_fn(model, cfg, x, y, device, fuse))
    return out


def ratios(times: dict[str, list[float]], objective: str, k: int, step: str) -> dict:
    """Per-round step / ideal for both ideals; median and range over rounds."""
    out = {}
    for which in ("issue", "honest"):
        train = "train 2B" if which == "honest" and objective in PAIRED else "train B"
        per = []
        for i, t in enumerate(times[step]):
            ideal = k * times["attack"][i] + times[train][i] + times["text"][i]
            ideal += times["frozen"][i] if objective in FROZEN else 0.0
            per.append(t / ideal)
        out[which] = {"median": round(statistics.median(per), 3), "min": round(min(per), 3),
                      "max": round(max(per), 3)}
    return out




def overheads(model: PromptedCLIP, x: torch.Tensor, device: torch.device, eps: float, k: int) -> dict:
    """Per-step host-side work of the attack, measured alone (ms per step)."""
    x_adv = (x + eps * torch.randn_like(x).sign()).clamp(0, 1)

    def mode() -> None:
        with attack_mode(model):
            pass
    fns = {"attack_mode enter+exit": mode,
           "input range check (min/max)": lambda: bool(x.min() < 0 or x.max() > 1),
           f"project_linf x{k + 2}": lambda: [project_linf(x_adv, x, eps) for _ in range(k + 2)],
           "random start: CPU rand + copy": lambda: torch.rand(x.shape).to(device),
           "random start: rand on device": lambda: torch.rand(x.shape, device=device)}
    return {name: round(1000 * time_call(fn, device, calibrate(fn, device, 0.1)), 3) for name, fn in fns.items()}



def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def ideal_flops(pass_flops: dict[str, int], objective: str, k: int) -> int:
    train = pass_flops["train 2B"] if objective in PAIRED else pass_flops["train B"]
    return k * pass_flops["attack"] + train + pass_flops["text"] + (pass_flops["frozen"] if objective in FROZEN else 0)


def batch_of(model: PromptedCLIP, batch: int, classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    return x, torch.randint(0, classes, (batch,), generator=g).to(device)


def measure(args: argparse.Namespace, device: torch.device, compiled: bool) -> dict:
    """All timings of one model (eager or compiled); returns the result block."""
    register_model_configs()
    depth = args.depth or min(9, open_clip.get_model_config(args.model)["vision_cfg"]["layers"])
    torch.manual_seed(0)
    cfg = make_cfg(args, "capt", args.steps[0], depth)
    model = build_model(cfg, class_names(args.classes), ["a photo of a {}."], device)
    model.train()
    x, y = batch_of(model, args.batch, args.classes, device)
    comps = components(model, cfg, x, y, device) if args.components else {}
    steps = step_variants(args, model, depth, x, y, device)
    # FLOPs are counted on the eager model, before any compilation (the compiled one does the same work)
    step_flops = {name: count_flops(v[3]) for name, v in steps.items()}
    pass_flops = {n: count_flops(fn) for n, fn in comps.items()}
    check = frozen_logits(model, cfg, x, device) if compiled else None
    if compiled:
        compile_blocks(model)
    fns = {**comps, **{name: v[3] for name, v in steps.items()}}
    warmup = {name: round(time_call(fn, device), 3) for name, fn in fns.items()}  # compiles, when compiling
    times = rounds(fns, device, args.rounds, args.min_seconds)
    block = {"compiled": compiled, "depth": depth, "warmup_s": warmup,
             "passes_ms": {n: summary([1000 * t for t in times[n]], 2) for n in comps}, "steps": {}}
    if check is not None:
        got = frozen_logits(model, cfg, x, device)
        block["compiled_vs_eager_frozen_logits"] = {
            "max_abs_diff": round(float((got - check).abs().max()), 6), "max_abs_logit": round(float(check.abs().max()), 3)}
    peak, ceiling = peak_tflops(args, device), matmul_tflops(device)
    block["peak_tflops"], block["matmul_ceiling_tflops"] = peak, ceiling
    for name, (objective, k, _fuse, fn) in steps.items():
        med = statistics.median(times[name])
        achieved = step_flops[name] / 1e12 / med
        row = {"ms": summary([1000 * t for t in times[name]], 2), "images_per_s": round(args.batch / med, 2),
               "gflop_per_step": round(step_flops[name] / 1e9, 3), "achieved_tflops": round(achieved, 4),
               "mfu": round(achieved / peak, 4) if peak else None,
               "mfu_vs_measured_ceiling": round(achieved / ceiling, 4) if ceiling else None,
               "peak_memory_gib": peak_memory(fn, device)}
        if comps:
            row["ratio"] = ratios(times, objective, k, name)
            row["flop_ratio_honest"] = round(step_flops[name] / ideal_flops(pass_flops, objective, k), 4)
        block["steps"][name] = row
    if pass_flops:
        block["pass_gflop"] = {n: round(f / 1e9, 4) for n, f in pass_flops.items()}
    first_name, first = next(iter(steps.items()))
    block["attention_kernels"] = attention_kernels(first[3])
    block["overheads_ms_per_step"] = overheads(model, x, device, 1 / 255, args.steps[0])
    mfu = block["steps"][first_name]["mfu"]
    if args.profile_below is not None and (mfu is None or mfu < args.profile_below):
        block["profile"] = {"step": first_name, "mfu": mfu, **profile_summary(first[3], device)}
    if args.max_batch and not compiled:
        block["memory"] = memory_figures(args, model, cfg, device)
    return block


def frozen_logits(model: PromptedCLIP, cfg: Config, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The frozen pass of a step (eval, no grad, autocast as configured): compiled vs eager check."""
    was = model.training
    model.eval()
    with torch.no_grad(), autocast(cfg, device):
        out = model.frozen_logits(x).float()
    model.train(was)
    return out


def memory_figures(args: argparse.Namespace, model: PromptedCLIP, cfg: Config, device: torch.device) -> dict:
    """CUDA: peak memory of the CAPT step at --batch and of an evaluation PGD iteration (fp32, batch
    eval.batch_size), this process's CUDA context, how many such trials fit on the GPU, and the
    largest training batch that fits (fitted at two sizes, then run)."""
    if device.type != "cuda":
        return {"skipped": "no device memory to measure off CUDA"}

    def peak_at(batch: int, evaluation: bool = False) -> int:
        x, y = batch_of(model, batch, args.classes, device, seed=1)
        fn = eval_attack_fn(model, x, y) if evaluation else step_fn(model, cfg, x, y, device, fuse=True)
        try:
            if batch <= max(args.batch, *args.fit_sizes):  # a first call's peak is >= the steady state's:
                fn()  # warm up where the figure is reported; the large-batch check needs one call
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        finally:
            del x, y, fn
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()

    train_peak = peak_at(args.batch)
    eval_peak = peak_at(cfg.eval.batch_size, evaluation=True)
    reserved = torch.cuda.max_memory_reserved(device)
    free, total = torch.cuda.mem_get_info(device)
    context = max(0, total - free - torch.cuda.memory_reserved(device))
    out = {"train_step_peak_gib": round(train_peak / 2**30, 3), "train_batch": args.batch,
           "eval_pgd_iteration_peak_gib": round(eval_peak / 2**30, 3), "eval_batch": cfg.eval.batch_size,
           "trials_per_gpu": trials_per_gpu(total, max(reserved, train_peak, eval_peak), context)}
    out["largest_batch"] = fit_batch(peak_at, total - context, sizes=tuple(args.fit_sizes))
    return out


def eval_attack_fn(model: PromptedCLIP, x: torch.Tensor, y: torch.Tensor):
    """One iteration of the evaluation PGD (fp32, eval mode, gradient to the input only)."""
    attack = build_attack("pgd", eps=1 / 255, steps=1, module=model, keep_best=False)
    with torch.no_grad():
        text = model.text_features()
    return lambda: attack(lambda z: model.logits(z, text), x, y)


def log_block(block: dict) -> None:
    log.info("%s (%s)", "compiled" if block["compiled"] else "eager", ", ".join(block["attention_kernels"]))
    for name, s in block["passes_ms"].items():
        log.info("  %-10s %10.2f ms  (spread %5.1f%%)", name, s["median"], s["spread_pct"])
    log.info("  %-28s %10s %9s %8s %8s %14s %14s", "step", "ms", "img/s", "TFLOP/s", "MFU", "ratio issue",
             "ratio honest")
    for name, r in block["steps"].items():
        ratio = ""
        if "ratio" in r:
            iss, hon = r["ratio"]["issue"], r["ratio"]["honest"]
            ratio = (f"{iss['median']:5.3f} [{iss['min']:.2f}-{iss['max']:.2f}] "
                     f"{hon['median']:5.3f} [{hon['min']:.2f}-{hon['max']:.2f}]")
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        log.info("  %-28s %10.2f %9.2f %8.2f %8s %s", name, r["ms"]["median"], r["images_per_s"],
                 r["achieved_tflops"], mfu, ratio)
    if "profile" in block:
        log.info("  profile: %s", block["profile"]["verdict"])
    mem = block.get("memory", {})
    if "trials_per_gpu" in mem:
        log.info("  memory: step %.2f GiB, eval PGD %.2f GiB, %s trials per GPU, largest batch %s",
                 mem["train_step_peak_gib"], mem["eval_pgd_iteration_peak_gib"], mem["trials_per_gpu"]["trials"],
                 mem["largest_batch"]["verified_max_batch"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="capt-small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, nargs="+", default=[2, 3], help="PGD steps K")
    p.add_argument("--objectives", nargs="+", default=["capt", "ce_adv"], choices=sorted(METHOD))
    p.add_argument("--depth", type=int, default=None, help="prompt depth (default: min(9, layers))")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-seconds", type=float, default=0.2, help="least time of one measurement")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only, as optim.amp)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off", help="regional torch.compile")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--no-components", dest="components", action="store_false",
                   help="skip the single passes (and the step / ideal ratios): less to compile")
    p.add_argument("--fused-only", action="store_true", help="only the fused step of CAPT / FAP (less to compile)")
    p.add_argument("--profile-below", type=float, default=None,
                   help="profile the first step when its MFU is below this (or unknown)")
    p.add_argument("--max-batch", action="store_true", help="CUDA: memory figures and the largest batch")
    p.add_argument("--fit-sizes", type=int, nargs=2, default=[32, 64], help="batches of the memory fit")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_step.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    blocks = []
    for compiled in modes:
        blocks.append(measure(args, device, compiled))
        log_block(blocks[-1])
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    setup.update(clock=clock_name(device), amp_active=args.amp and device.type == "cuda")
    record(args.out, device, setup, blocks)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
