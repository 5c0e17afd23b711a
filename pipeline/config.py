"""One frozen, typed configuration for a training / evaluation run.

Resolution order: dataclass defaults -> the method's preset (``METHOD_PRESETS``) -> a YAML file ->
``key=value`` overrides. Every key is checked against the dataclasses: an unknown key, a wrong type
or an out-of-range value raises :class:`ConfigError` with a one-line message naming the key.

Units: attack ``eps`` and ``step_size`` are given in 1/255 pixel units, as in every paper of this
family; :meth:`AttackConfig.eps_px` / :meth:`AttackConfig.step_px` are the single place where they
are converted to the [0, 1] pixel scale the models see.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line naming the culprit."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "capt-tiny"  # open_clip architecture name (e.g. ViT-B-16) or a registered tiny config
    pretrained: str | None = None  # open_clip pretrained tag, e.g. "openai" (downloads where online)
    checkpoint: str | None = None  # local weights file; takes precedence over `pretrained`
    trim_context: bool = True  # trim the text context to the longest real prompt (same logits)


@dataclass(frozen=True)
class PromptConfig:
    design: str = "ivlp"  # none | coop | vpt | ivlp | maple | fap  (see pipeline/prompts.py)
    n_ctx_text: int = 2
    n_ctx_vision: int = 2
    depth: int = 9  # number of transformer layers that receive prompts (1 = input layer only)
    init: str = "a photo of a"  # words whose embeddings initialise the text context ("" = random)
    fap_layer0: str = "separate"  # fap design, layer-0 vision prompt: separate (ours) | coupled (official FAP)


@dataclass(frozen=True)
class AttackConfig:
    name: str = "pgd"  # pgd | cw | none
    eps: float = 1.0  # l-inf radius in 1/255 units
    steps: int = 2
    step_size: float | None = None  # in 1/255 units; default eps / steps * 1.0 (at least eps/4)
    loss: str = "ce"  # ce | kl (maximise KL to the clean prediction, as FAP does) | margin
    random_start: bool = True

    @property
    def eps_px(self) -> float:
        return self.eps / 255.0

    @property
    def step_px(self) -> float:
        if self.step_size is not None:
            return self.step_size / 255.0
        return max(self.eps / max(self.steps, 1), self.eps / 4) / 255.0


@dataclass(frozen=True)
class LossConfig:
    objective: str = "capt"  # none | ce_clean | ce_adv | capt | fap
    lam: float = 1.0  # CAPT: weight of the consistency term
    alpha_rule: str = "ratio"  # CAPT: fixed | ratio | confidence  (see pipeline/losses.py)
    alpha: float = 0.5  # CAPT: alpha when alpha_rule = fixed
    frozen_input: str = "adv"  # CAPT: frozen model sees the clean or the adversarial image: clean | adv
    fap_weight: float = 1.5  # FAP: weight of the consistency term


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.0035
    epochs: int = 5
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    amp: bool = True  # bf16 autocast when running on CUDA (ignored on CPU)


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # shards folder (meta.json + tars)
    shots: int | None = 16  # per class, None = all
    classes: str = "all"  # all | base | new  (CoOp base-to-new split of the class list)
    seed: int = 0
    train_split: str = "train"
    test_split: str = "test"
    test_limit: int | None = None  # evaluate on at most this many test images (None = all)
    strict: bool = False  # corrupt shard: error instead of skip-with-warning
    cross_datasets: tuple[str, ...] = ()  # other shard folders evaluated zero-shot after training
    augment: str = "rrcrop_flip"  # none | flip | rrcrop_flip (random resized crop + flip, as the peers train)
    shuffle: bool = True  # training order shuffled per epoch (seeded by run.seed and the epoch)
    stream: str = "auto"  # auto: a split larger than data.memory_mb streams | always | never
    memory_mb: int = 4096  # per split: the decoded uint8 split held in memory up to this size
    workers: int = 2  # DataLoader workers that decode a streamed training split
    cache: str = ""  # folder of content-addressed subsets (the search sets <storage>/data_subsets)


@dataclass(frozen=True)
class EvalConfig:
    attack: str = "pgd"  # per-epoch monitor attack: pgd | cw | none
    steps: int = 10
    eps: float | None = None  # default: the training attack's eps
    final_attacks: tuple[str, ...] = ("pgd100",)  # after training: pgd100 | cw100 | autoattack
    final_eps: tuple[float, ...] = ()  # default: (training eps,)
    batch_size: int = 64
    autoattack_limit: int | None = None  # AutoAttack on the first n test images only (null: all)


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 1  # epochs


@dataclass(frozen=True)
class Config:
    method: str = "capt"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **overrides: Any) -> Config:
        """A new config with dotted-key overrides applied (``replace(**{"loss.lam": 2.0})``)."""
        tree = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(tree, key, value)
        return from_dict(tree)


# Each method of the family is a choice of prompts, loss and training attack (METHOD.md).
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "zeroshot": {
        "prompt": {"design": "none"},
        "attack": {"name": "none"},
        "loss": {"objective": "none"},
        "optim": {"epochs": 0},
    },
    "apt": {
        "prompt": {"design": "coop", "n_ctx_text": 16, "depth": 1},
        "attack": {"name": "pgd", "eps": 4.0, "steps": 3, "step_size": 2.67},
        "loss": {"objective": "ce_adv"},
        "optim": {"lr": 0.002},
    },
    "advvlp": {
        "prompt": {"design": "ivlp", "n_ctx_text": 2, "n_ctx_vision": 2, "depth": 9},
        "attack": {"name": "pgd", "eps": 1.0, "steps": 2, "step_size": 1.0},
        "loss": {"objective": "ce_adv"},
    },
    "advmaple": {
        "prompt": {"design": "maple", "n_ctx_text": 2, "n_ctx_vision": 2, "depth": 9},
        "attack": {"name": "pgd", "eps": 1.0, "steps": 2, "step_size": 1.0},
        "loss": {"objective": "ce_adv"},
    },
    "fap": {
        "prompt": {"design": "fap", "n_ctx_text": 2, "n_ctx_vision": 2, "depth": 9},
        "attack": {"name": "pgd", "eps": 1.0, "steps": 2, "step_size": 1.0, "loss": "kl"},
        "loss": {"objective": "fap", "fap_weight": 1.5},
    },
    "capt": {
        "prompt": {"design": "ivlp", "n_ctx_text": 2, "n_ctx_vision": 2, "depth": 9},
        "attack": {"name": "pgd", "eps": 1.0, "steps": 2, "step_size": 1.0},
        "loss": {"objective": "capt", "lam": 1.0, "alpha_rule": "ratio"},
    },
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "prompt.design": ("none", "coop", "vpt", "ivlp", "maple", "fap"),
    "prompt.fap_layer0": ("separate", "coupled"),
    "attack.name": ("pgd", "cw", "none"),
    "attack.loss": ("ce", "kl", "margin"),
    "loss.objective": ("none", "ce_clean", "ce_adv", "capt", "fap"),
    "loss.alpha_rule": ("fixed", "ratio", "confidence"),
    "loss.frozen_input": ("clean", "adv"),
    "data.classes": ("all", "base", "new"),
    "data.augment": ("none", "flip", "rrcrop_flip"),
    "data.stream": ("auto", "always", "never"),
    "eval.attack": ("pgd", "cw", "none"),
}
# the final-evaluation attacks by name (pipeline/evaluate.py maps each to an attack and its step count)
FINAL_ATTACKS = ("pgd10", "pgd20", "pgd100", "cw100", "autoattack")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults -> method preset -> YAML file -> ``key=value`` overrides, validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return from_dict(tree)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    """``"loss.lam=2"`` -> ``("loss.lam", 2)``; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from a (partial) nested dict."""
    tree = copy.deepcopy(tree)
    method = tree.get("method", Config.method)
    if method not in METHOD_PRESETS:
        raise ConfigError(f"method: unknown method {method!r}; choose one of {sorted(METHOD_PRESETS)}")
    merged = _merge(copy.deepcopy(METHOD_PRESETS[method]), tree)
    cfg = _build(Config, merged, prefix="")
    validate(cfg)
    return cfg


def eval_eps(cfg: Config) -> float:
    """The eps (1/255 units) that robust accuracy is measured at: ``eval.eps``, else the training eps."""
    return cfg.eval.eps if cfg.eval.eps is not None else cfg.attack.eps


def validate(cfg: Config) -> None:
    """Range and choice checks that do not need the model (depth is checked against the model later)."""
    flat = _flatten(cfg.to_dict())
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {list(choices)}")
    for name in cfg.eval.final_attacks:
        if name not in FINAL_ATTACKS:
            raise ConfigError(f"eval.final_attacks: unknown attack {name!r}; choose from {list(FINAL_ATTACKS)}")
    a = cfg.attack
    if not 0 <= a.eps <= 255:
        raise ConfigError(f"attack.eps: {a.eps} out of range [0, 255] (units of 1/255)")
    if a.steps < 0 or (a.step_size is not None and a.step_size < 0):
        raise ConfigError("attack.steps / attack.step_size must be >= 0")
    if cfg.eval.autoattack_limit is not None and cfg.eval.autoattack_limit < 1:
        raise ConfigError(f"eval.autoattack_limit: {cfg.eval.autoattack_limit} must be >= 1 (or null: all images)")
    if cfg.eval.eps is not None and not 0 <= cfg.eval.eps <= 255:
        raise ConfigError(f"eval.eps: {cfg.eval.eps} out of range [0, 255] (units of 1/255)")
    for e in cfg.eval.final_eps:
        if not 0 <= e <= 255:
            raise ConfigError(f"eval.final_eps: {e} out of range [0, 255] (units of 1/255)")
    p = cfg.prompt
    if p.design != "none":
        if p.depth < 1:
            raise ConfigError(f"prompt.depth: {p.depth} must be >= 1")
        if p.n_ctx_text < 1 or p.n_ctx_vision < 1:
            raise ConfigError("prompt.n_ctx_text / prompt.n_ctx_vision must be >= 1")
    o = cfg.optim
    if o.lr <= 0 or o.epochs < 0 or o.batch_size < 1 or o.warmup_epochs < 0:
        raise ConfigError("optim: lr must be > 0, epochs >= 0, batch_size >= 1, warmup_epochs >= 0")
    if cfg.loss.lam < 0 or not 0 <= cfg.loss.alpha <= 1:
        raise ConfigError("loss.lam must be >= 0 and loss.alpha in [0, 1]")
    if cfg.data.memory_mb < 0 or cfg.data.workers < 0:
        raise ConfigError("data.memory_mb / data.workers must be >= 0")
    if cfg.data.shots is not None and cfg.data.shots < 1:
        raise ConfigError(f"data.shots: {cfg.data.shots} must be >= 1 or null (all)")
    if cfg.loss.objective in ("ce_adv", "capt", "fap") and a.name == "none":
        raise ConfigError(f"loss.objective={cfg.loss.objective} needs a training attack (attack.name)")


# ----------------------------------------------------------------------------- helpers

def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config key: {prefix}{key}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, values[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(values[f.name], hint, f"{prefix}{f.name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return base


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


flatten = _flatten
set_dotted = _set_dotted
