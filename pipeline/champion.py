"""The search's champion in MLflow: a pyfunc model (``pipeline/champion_model.py``) logged under the best
trial's run (``champion/``), registered as a new version of ``tracking.register_model`` with the alias
``champion`` and a description of what it is, on what data, how robust, and how to load it."""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import champion_model, tracking

log = logging.getLogger("pipeline.search")
ARTIFACT = "champion"
_REQUIREMENTS = ("torch", "torchvision", "open_clip_torch", "numpy", "mlflow", "pyyaml", "webdataset")


def save_champion(path: str | Path, prompts_file: str | Path) -> Path:
    """Write the pyfunc model folder (MLmodel, the model code, ``pipeline/``, prompts, CLIP checkpoint)."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline.search_report import image_size

    state = champion_model.read_prompts(prompts_file)
    size, n = image_size(state["config"]["model"]["name"]), len(state["classnames"])
    artifacts = {champion_model.PROMPTS: str(prompts_file)}
    ckpt = state["config"]["model"].get("checkpoint")
    if ckpt:
        artifacts[champion_model.CHECKPOINT] = str(ckpt)
    example = np.full((1, 3, size, size), 0.5, dtype=np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n))]))
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "pipeline"
        shutil.copytree(Path(champion_model.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
        with warnings.catch_warnings():  # "add type hints to predict": the signature below is the schema
            warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
            mlflow.pyfunc.save_model(
                path=str(path), python_model=champion_model.__file__, artifacts=artifacts, code_paths=[str(code)],
                signature=signature, input_example=example, pip_requirements=_requirements(),
                metadata={"classnames": list(state["classnames"]), "model": state["config"]["model"]["name"],
                          "pretrained": state["config"]["model"].get("pretrained")})
    return Path(path)


def register_champion(uri: str, run_id: str, prompts_file: str | Path, name: str, description: str) -> str:
    """Log the champion model under ``run_id`` (the best trial's run), register it as a new version of
    ``name`` with ``description`` and point the ``champion`` alias at it. Returns the version."""
    client = MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_champion(Path(tmp) / ARTIFACT, prompts_file)
        tracking.retry(client.log_artifacts, run_id, str(folder), ARTIFACT)
    try:
        client.create_registered_model(name, description="CAPT prompted CLIP chosen by a hyperparameter search; "
                                                         "the alias @champion is the latest search's best trial")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{ARTIFACT}"
    version = client.create_model_version(name, source=source, run_id=run_id, description=description,
                                          tags={"prompts_file": Path(prompts_file).name})
    client.set_registered_model_alias(name, tracking.CHAMPION, version.version)
    return str(version.version)


def version_description(name: str, *, search: str, best: dict[str, Any], cfg: Any, link: str,
                        attacks: list[str]) -> str:
    """Markdown for the model version page: what, on what data, how robust, how to load."""
    final = best["final"]
    model = cfg.model.name + (f" ({cfg.model.pretrained})" if cfg.model.pretrained else
                              " (local checkpoint, shipped with the model)" if cfg.model.checkpoint else " (random init)")
    lines = [f"**{cfg.method.upper()} prompts** ({cfg.prompt.design}, depth {cfg.prompt.depth}) on a frozen CLIP "
             f"**{model}**, from search `{search}`, best trial [{best.get('name') or best['trial_id']}]({link}).", "",
             f"- Data: `{Path(str(cfg.data.path)).name}` ({cfg.data.shots}-shot training split; scores on its test "
             "split" + (f", first {cfg.data.test_limit} images" if cfg.data.test_limit else "") + ")",
             f"- Clean accuracy: {_pct(final.get('clean_acc'))}"]
    for attack in attacks:
        for key, value in sorted(final.items()):
            if key == f"{attack}_acc":
                lines.append(f"- Robust accuracy, {attack} at eps {best['eps']:g}/255: {_pct(value)}")
            elif key.startswith(f"{attack}_acc_eps"):
                lines.append(f"- Robust accuracy, {attack} at eps {key.rsplit('eps', 1)[1]}/255: {_pct(value)}")
    lines += ["", "Load it (pyfunc; images float32 (N, 3, H, W) in [0, 1] -> class probabilities, columns in the "
              "order of the model's `classnames` metadata):", "", "```python", "import mlflow",
              f'model = mlflow.pyfunc.load_model("models:/{name}@{tracking.CHAMPION}")',
              "probs = model.predict(images)", "```"]
    return "\n".join(lines)


def _requirements() -> list[str]:
    out = []
    for pkg in _REQUIREMENTS:
        try:
            out.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"
