#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the project and its locked dependencies.
#   bash scripts/install.sh            -> ./.venv
#   VENV=/some/dir bash scripts/install.sh
# torch comes from the package registry (its CUDA build also runs on CPU-only machines); a local
# CPU-only torch wheel would break torchvision's compiled ops, which open_clip and torchattacks need.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# constraints pin every transitive version (requirements.lock); -e keeps the checkout importable
"$VENV/bin/python" -m pip install -q -c requirements.lock -e ".[dev]"
# torchattacks 3.5.1 pins requests~=2.25 (clashes with ray/mlflow); its real needs are installed above
"$VENV/bin/python" -m pip install -q --no-deps torchattacks==3.5.1
"$VENV/bin/python" -c "import torchvision.ops, open_clip, torchattacks, ray, optuna, mlflow, webdataset; print('environment ok:', '$VENV')"
