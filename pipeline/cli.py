"""``capt``: the one command-line entry point.

Subcommands: shards, tiny-clip, train, eval, demo (pipeline/commands.py), search
(pipeline/search.py), tapt and tapt-stats (pipeline/tapt_cli.py). A configuration or input problem
ends with one line ``capt: error: ...`` naming the culprit and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .config import FINAL_ATTACKS, ConfigError

# modules that add their own subcommands with register(subparsers)
_PLUGINS = ("pipeline.search", "pipeline.tapt_cli", "pipeline.compare")


def build_parser() -> argparse.ArgumentParser:
    from . import commands as c

    p = argparse.ArgumentParser(prog="capt", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("shards", help="image folders, existing tars or a demo data set -> indexed shards folder")
    s.add_argument("--from-folder", action="append", metavar="[SPLIT=]DIR",
                   help="DIR/<class name>/<image> tree (a random --test-fraction is held out), or SPLIT=DIR "
                        "once per split (e.g. --from-folder train=/in/train --from-folder test=/in/val)")
    s.add_argument("--demo", choices=["digits", "fashion"],
                   help="digits: scikit-learn's bundled handwritten digits; fashion: Fashion-MNIST from its IDX "
                        "files (Debian package dataset-fashion-mnist; official train/test split plus a val split)")
    s.add_argument("--source", help="fashion: folder of the IDX .gz files (default $CAPT_FASHION_MNIST, else "
                                    "/usr/share/datasets/fashion-mnist)")
    s.add_argument("--val-per-class", type=int, default=100,
                   help="fashion: images per class carved from the official train split into `val` (0: none)")
    s.add_argument("--limit", type=int, default=None, help="fashion: first N images of each official split only")
    s.add_argument("--adopt", metavar="DIR", help="index existing WebDataset tars in DIR in place "
                   "(with --classes and --split; the tars are not rewritten)")
    s.add_argument("--classes", metavar="FILE", help="--adopt: class names, one per line (or a JSON list)")
    s.add_argument("--split", action="append", metavar="SPLIT=GLOB",
                   help="--adopt: tar files of a split, e.g. --split 'train=*-train-*.tar' --split 'test=*-val-*.tar'")
    s.add_argument("--label-key", default="label", help="--adopt: label field of a sample's .json (when no .cls)")
    s.add_argument("--index", metavar="DIR", help="rebuild the index of a shards folder in place")
    s.add_argument("--out", help="output folder (--from-folder, --demo)")
    s.add_argument("--test-fraction", type=float, default=None)
    s.add_argument("--shard-size", type=int, default=None, help="samples per shard")
    s.add_argument("--image-format", choices=["png", "jpg"], default="png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an existing shards folder")
    s.set_defaults(func=c.cmd_shards)

    s = sub.add_parser("tiny-clip", help="train a small CLIP from scratch on shards (offline demo model)")
    s.add_argument("--data", required=True, nargs="+",
                   help="shards folder(s); several are trained together (union of their classes)")
    s.add_argument("--out", required=True, help="FILE.pt")
    s.add_argument("--model", default="capt-small", help="capt-tiny | capt-small | capt-base or any open_clip name")
    s.add_argument("--steps", type=int, default=500)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=c.cmd_tiny_clip)

    s = sub.add_parser("train", help="train one method (CAPT or a peer) and evaluate it")
    s.add_argument("--config", required=True)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--out", required=True)
    s.set_defaults(func=c.cmd_train)

    s = sub.add_parser("eval", help="evaluate a trained run: clean, PGD, CW, AutoAttack, base-to-new, cross")
    s.add_argument("--run", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--attack", nargs="+", choices=FINAL_ATTACKS)
    s.add_argument("--eps", nargs="+", type=float, help="in 1/255 units")
    s.add_argument("--base-to-new", action="store_true")
    s.add_argument("--cross", nargs="+", help="other shards folders, evaluated zero-shot")
    s.add_argument("--limit", type=int, default=None, help="at most this many test images")
    s.add_argument("--autoattack-limit", type=int, default=None, metavar="N",
                   help="AutoAttack on the first N of those only (its Square stage is costly), with the other "
                        "attacks also reported on the same N (<attack>-aasub_acc)")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.set_defaults(func=c.cmd_eval)

    s = sub.add_parser("demo", help="offline demo: digits + tiny CLIP, zero-shot and CAPT")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=c.cmd_demo)

    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"capt: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
