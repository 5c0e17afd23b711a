"""Text tower: context trimmed to the longest real prompt vs padded to 77 tokens (same features).

Run (CPU, 1 torch thread; ViT-B-32 text tower with random weights; about 20 minutes, most of it
the padded 1000-class passes):

    python benchmarks/bench_text.py --classes 100 1000 --rounds 5 2 --out benchmarks/results/bench_text.json

For C ImageNet-like class names (made here, see common.class_names) and the template
"a photo of a {}.", two passes are timed with ``PromptedCLIP.trim`` on and off:

* ``frozen``: the zero-shot template features (``_template_features``: forward, no gradient);
* ``coop``: the tuned class features (``text_features()``, design coop, ``--n-ctx`` learned tokens
  as APT): forward + backward to the prompt; run in chunks of ``--chunk`` classes (gradients
  accumulate), because the padded 1000-class backward would hold about 20 GB of activations.

Equality: max |difference| of the normalised text features, of the logits against 8 random images
(logit scale 100, as trained CLIPs), and of the prompt gradient, trimmed vs padded.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import torch
from common import class_names, clock_name, record, rounds, summary  # first: puts the repository on sys.path

from pipeline.clip import load_clip
from pipeline.config import ModelConfig, PromptConfig
from pipeline.prompts import PromptedCLIP

log = logging.getLogger("bench_text")
TEMPLATES = ["a photo of a {}."]
TOKEN_BUFFERS = ("tok_prefix", "tok_suffix", "tok_eot")


def build(args: argparse.Namespace, n_classes: int) -> tuple[PromptedCLIP, dict, dict]:
    """One model and the coop token buffers of both variants (trimmed, padded)."""
    torch.manual_seed(0)
    loaded = load_clip(ModelConfig(name=args.model))
    cfg = PromptConfig(design="coop", n_ctx_text=args.n_ctx, depth=1)
    model = PromptedCLIP(loaded, cfg, class_names(n_classes), TEMPLATES, trim_context=True)
    trimmed = {k: getattr(model, k) for k in TOKEN_BUFFERS}
    model.trim = False
    model._template_features = lambda chunk=512: model.frozen_text  # skip recomputing the frozen features here
    model.set_classes(model.classnames, model.templates)
    del model._template_features
    padded = {k: getattr(model, k) for k in TOKEN_BUFFERS}
    return model, trimmed, padded


def use(model: PromptedCLIP, buffers: dict, rows: slice | None = None) -> None:
    for k, v in buffers.items():
        setattr(model, k, v if rows is None else v[rows])


def frozen_pass(model: PromptedCLIP, trim: bool):
    def run() -> torch.Tensor:
        model.trim = trim
        with torch.no_grad():
            return model._template_features()
    return run


def coop_pass(model: PromptedCLIP, buffers: dict, g: torch.Tensor, chunk: int):
    """Forward + backward of the tuned class features, ``chunk`` classes at a time; returns (features, grad)."""
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        feats = []
        n = len(g)
        for i in range(0, n, chunk):
            use(model, buffers, slice(i, i + chunk))
            f = model.text_features()
            (f * g[i:i + chunk]).sum().backward()
            feats.append(f.detach())
        use(model, buffers)
        return torch.cat(feats), model.prompts.text[0].grad.clone()
    return run


def equality(model: PromptedCLIP, fns: dict, size: int) -> dict:
    """Max |trimmed - padded| of features, logits (scale 100) and the prompt gradient."""
    with torch.no_grad():
        img = model.image_features(torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(0)))
    out = {}
    for name in ("frozen", "coop"):
        a, b = fns[f"{name} trimmed"](), fns[f"{name} padded"]()
        fa, fb = (a[0], b[0]) if name == "coop" else (a, b)
        out[name] = {"features_max_abs_diff": float((fa - fb).abs().max()),
                     "logits_max_abs_diff": float((100 * img @ fa.t() - 100 * img @ fb.t()).abs().max())}
        if name == "coop":
            out[name]["grad_max_abs_diff"] = float((a[1] - b[1]).abs().max())
            out[name]["grad_max_abs"] = float(b[1].abs().max())
    return out


def measure(args: argparse.Namespace, n_classes: int, n_rounds: int) -> dict:
    model, trimmed, padded = build(args, n_classes)
    g = torch.randn(n_classes, model.frozen_text.shape[1], generator=torch.Generator().manual_seed(1))
    fns = {"frozen trimmed": frozen_pass(model, True), "frozen padded": frozen_pass(model, False),
           "coop trimmed": coop_pass(model, trimmed, g, args.chunk),
           "coop padded": coop_pass(model, padded, g, args.chunk)}
    lengths = {"frozen trimmed": int(model.tokenizer([TEMPLATES[0].format(c) for c in model.classnames])
                                     .argmax(dim=-1).max()) + 1,
               "coop trimmed": trimmed["tok_prefix"].shape[1] + args.n_ctx + trimmed["tok_suffix"].shape[1],
               "frozen padded": model.tokenizer(["x"]).shape[1], "coop padded": 77}
    same = equality(model, fns, model.image_size)
    times = rounds(fns, torch.device("cpu"), n_rounds, min_seconds=0.0, warmup=False)  # equality() warmed up
    row = {"classes": n_classes, "n_ctx": args.n_ctx, "context_length": lengths, "equality": same,
           "seconds": {k: summary(v, 3) for k, v in times.items()}}
    for name in ("frozen", "coop"):
        per = [p / t for t, p in zip(times[f"{name} trimmed"], times[f"{name} padded"], strict=True)]
        row[f"{name}_speedup"] = {"median": round(statistics.median(per), 2), "min": round(min(per), 2),
                                  "max": round(max(per), 2)}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--rounds", type=int, nargs="+", default=[5, 2], help="rounds per --classes entry")
    p.add_argument("--n-ctx", type=int, default=16, help="learned context tokens (APT: 16)")
    p.add_argument("--chunk", type=int, default=100, help="classes per forward+backward of the coop pass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_text.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("pipeline.clip").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    n_rounds = args.rounds + [args.rounds[-1]] * (len(args.classes) - len(args.rounds))
    rows = []
    for n_classes, r in zip(args.classes, n_rounds, strict=False):
        rows.append(measure(args, n_classes, r))
        row = rows[-1]
        for name in ("frozen", "coop"):
            s, eq = row[f"{name}_speedup"], row["equality"][name]
            log.info("C=%4d %-6s L %2d vs %2d: %7.2f s vs %7.2f s  speed-up %.2fx [%.2f-%.2f]  logits diff %.2g",
                     n_classes, name, row["context_length"][f"{name} trimmed"], row["context_length"][f"{name} padded"],
                     row["seconds"][f"{name} trimmed"]["median"], row["seconds"][f"{name} padded"]["median"],
                     s["median"], s["min"], s["max"], eq["logits_max_abs_diff"])
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    setup.update(clock=clock_name(torch.device("cpu")), templates=TEMPLATES)
    record(args.out, torch.device("cpu"), setup, rows)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
