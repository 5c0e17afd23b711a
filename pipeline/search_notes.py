"""Markdown descriptions (MLflow notes) of a search: the experiment, the parent run and each trial's run.

What a researcher opening the MLflow UI needs first: what was searched (the space with its ranges), the
objective with the attack, steps and eps (in 1/255) that measured it, how many trials ended how, the top
trials with links to their runs, and the best trial's strong-attack results beside zero-shot CLIP's.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import eval_eps, from_dict
from pipeline.search_checks import ASHA_DEFAULTS
from pipeline.search_space import ParamSpec, SearchSpec

TOP = 10  # trials listed in the table


def eval_params(cfg: Any) -> dict[str, Any]:
    """What measured the per-epoch ``robust_acc`` (and the training attack's unit), as run parameters."""
    return {"eval.attack": cfg.eval.attack, "eval.steps": cfg.eval.steps, "eval.eps": eval_eps(cfg),
            "robust_acc.measured_by": measured_by(cfg), "eps.unit": "1/255 of the pixel range (L-inf)"}


def measured_by(cfg: Any) -> str:
    if cfg.eval.attack == "none":
        return "no attack (robust_acc = clean_acc)"
    return f"{cfg.eval.attack.upper()}-{cfg.eval.steps} at eps {eval_eps(cfg):g}/255 (L-inf)"


def trial_label(state: str, epoch: Any) -> str | None:
    """The suffix of a trial's run name: its end at a glance in the runs table."""
    if state == "PRUNED":
        return f"pruned@epoch {int(epoch)}" if epoch is not None else "pruned"
    return {"COMPLETE": "complete", "FAIL": "failed", "INTERRUPTED": "interrupted"}.get(state)


def trial_note(state: str, result: dict[str, Any], epochs: int, error: str | None = None) -> str:
    """A trial run's description."""
    epoch = result.get("epoch")
    acc = f"clean_acc {_num(result.get('clean_acc'))}, robust_acc {_num(result.get('robust_acc'))}"
    if state == "COMPLETE":
        text = f"**Complete**: trained all {epochs} epochs; final {acc}."
    elif state == "PRUNED":
        text = (f"**Pruned** by the ASHA scheduler after epoch {epoch} of {epochs} ({acc}): its robust accuracy "
                "was below the better trials' at that rung. A normal outcome of the search, not an error "
                "(MLflow status FINISHED; a crash is FAILED).")
    elif state == "FAIL":
        when = f"after epoch {epoch} of {epochs}" if epoch else "before its first epoch ended"
        text = f"**Failed** {when} (MLflow status FAILED): {error or 'see the error tag and the Ray logs'}."
    else:
        text = f"**{state.title()}**."
    return text + "\n\nThe search's parent run describes the objective and lists the best trials."


def search_note(spec: SearchSpec, base: dict[str, Any], *, experiment_id: str, parent_id: str,
                rows: list[dict[str, Any]], best: list[dict[str, Any]], counts: dict[str, int],
                registered: dict[str, str] | None, for_experiment: bool = False) -> str:
    """The parent run's (and, with a link to the parent, the experiment's) description."""
    cfg = from_dict(base)
    link = _link(experiment_id)
    parts = [f"## Search `{spec.search.name}`: {cfg.method.upper()} on {cfg.model.name}, "
             f"{cfg.data.shots}-shot `{_data(cfg)}`"]
    if for_experiment:
        parts.append(f"Parent run of the latest search: [{spec.search.name}]({link(parent_id)}); one child run per "
                     "trial (expand the parent row in the runs table).")
    if best:
        b = best[0]
        parts.append(f"**Best trial: [{_name(b)}]({link(b.get('run_id'))})** - robust_acc "
                     f"{_num(b['robust_acc'])}, clean_acc {_num(b['final'].get('clean_acc'))} "
                     f"(run id `{b.get('run_id')}`, tag `capt.best_trial_run_id`).")
    else:
        parts.append("**No trial completed.**")
    parts += [_objective(spec, cfg), _space(spec), _counts(counts), _top(rows, link, spec)]
    if best:
        parts.append(_final(best, list(spec.search.final_attacks)))
    if registered:
        parts.append(f"Champion model: `{registered['name']}` version {registered['version']} "
                     f"(alias @{registered['alias']}), logged in the best trial's run under `champion/`: "
                     f"`mlflow.pyfunc.load_model(\"models:/{registered['name']}@{registered['alias']}\")"
                     ".predict(images)` gives class probabilities.")
    return "\n\n".join(parts)


def _objective(spec: SearchSpec, cfg: Any) -> str:
    objectives = ", ".join(f"`{o}`" for o in spec.search.objectives)
    searched = "eval.eps" in spec.space or (cfg.eval.eps is None and "attack.eps" in spec.space)
    how = (f"{cfg.eval.attack.upper()}-{cfg.eval.steps} at each trial's own eval eps (searched: see `eval.eps` "
           "in the tables)") if searched and cfg.eval.attack != "none" else measured_by(cfg)
    sched = {**ASHA_DEFAULTS, **spec.search.scheduler}
    return (f"**Objective**: maximise {objectives} at the last of {cfg.optim.epochs} epochs; `robust_acc` is measured "
            f"on the test split by {how}. Training attack: {cfg.attack.name.upper()}-"
            f"{cfg.attack.steps} at eps {cfg.attack.eps:g}/255. Sampler: Optuna TPE (seed {spec.search.seed}), "
            f"{spec.search.num_samples} trials; scheduler: {sched.get('type', 'asha').upper()} (grace period "
            f"{sched['grace_period']}, reduction factor {sched['reduction_factor']}). "
            "All eps are in 1/255 of the pixel range (L-inf).")


def _space(spec: SearchSpec) -> str:
    lines = ["**Search space**", "", "| parameter | distribution | range / choices |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | {_dist(p)} | {_range(p)} |" for k, p in spec.space.items()]
    return "\n".join(lines)


def _dist(p: ParamSpec) -> str:
    kind = p.type + (", log" if p.log else "") + (f", step {p.step:g}" if p.step else "")
    when = "; ".join(f"only when `{k}` in {list(v)}" for k, v in p.when.items())
    return kind + (f" ({when})" if when else "")


def _range(p: ParamSpec) -> str:
    if p.type == "categorical":
        return ", ".join(str(c) for c in p.choices)
    return f"[{p.low:g}, {p.high:g}]"


def _counts(counts: dict[str, int]) -> str:
    words = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    return ("**Trials**: " + ", ".join(f"{n} {words.get(s, s.lower())}" for s, n in counts.items())
            + " (pruned: stopped early by ASHA, run status FINISHED, name ending `pruned@epoch k`; "
            "failed: crashed, status FAILED).")


def _top(rows: list[dict[str, Any]], link: Any, spec: SearchSpec) -> str:
    rank = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2}
    order = sorted(rows, key=lambda r: (rank.get(r["state"], 3), -(r.get("robust_acc") or -1.0),
                                        -(r.get("clean_acc") or -1.0)))
    keys = list(spec.space)
    lines = [f"**Top trials** ({min(TOP, len(order))} of {len(order)}, by state then robust_acc)", "",
             "| trial | state | epochs | clean_acc | robust_acc | " + " | ".join(f"`{k}`" for k in keys) + " |",
             "| --- " * (5 + len(keys)) + "|"]
    for r in order[:TOP]:
        vals = [_val(r["params"].get(k)) for k in keys]
        lines.append(f"| [{_name(r)}]({link(r.get('run_id'))}) | {r['state'].lower()} | {r.get('epochs') or '-'} | "
                     f"{_num(r.get('clean_acc'))} | {_num(r.get('robust_acc'))} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _final(best: list[dict[str, Any]], attacks: list[str]) -> str:
    """Strong-attack accuracies of the best trial(s), zero-shot CLIP beside the first."""
    cols = sorted({k for b in best for k in b["final"] if k != "clean_acc"}, key=_eps_order)
    zero = best[0].get("zero_shot") or {}
    lines = ["**Final evaluation** on the test split (columns `<attack>_acc`: at the trial's eval eps, "
             f"{best[0]['eps']:g}/255 for the best; `<attack>_acc_eps<e>`: at eps e/255)", "",
             "| | clean_acc | " + " | ".join(f"`{c}`" for c in cols) + " |", "| --- " * (2 + len(cols)) + "|"]
    for b in best:
        lines.append(f"| {_name(b)} | {_num(b['final'].get('clean_acc'))} | "
                     + " | ".join(_num(b["final"].get(c)) for c in cols) + " |")
    if zero:
        lines.append("| zero-shot CLIP (no prompts) | " + _num(zero.get("clean_acc")) + " | "
                     + " | ".join(_num(zero.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _name(row: dict[str, Any]) -> str:
    return row.get("name") or row["trial_id"]


def _eps_order(key: str) -> tuple[str, float]:
    name, _, eps = key.partition("_eps")
    try:
        return name, float(eps) if eps else -1.0
    except ValueError:
        return key, 0.0


def _link(experiment_id: str) -> Any:
    return lambda run_id: f"#/experiments/{experiment_id}/runs/{run_id}" if run_id else "#"


def _data(cfg: Any) -> str:
    from pathlib import Path

    return Path(str(cfg.data.path)).name or str(cfg.data.path)


def _num(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def _val(v: Any) -> str:
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
