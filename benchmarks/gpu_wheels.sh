#!/usr/bin/env bash
# Download the Python wheels the GPU machine lacks into ./.whl (git-ignored), for benchmarks/gpu_check.sh.
#
#   bash benchmarks/gpu_wheels.sh          # run on a machine that reaches PyPI; ~10 s, about 2 MB
#
# The GPU machine (see benchmarks/README.md, "GPU") is offline and has Python 3.12, torch 2.11, torchvision,
# timm, huggingface_hub, safetensors, regex, tqdm, numpy, pillow, pyyaml, scipy, requests and pytest, but
# not open_clip, ftfy (and its wcwidth) or torchattacks. What the GPU tests and benchmarks import needs
# exactly these four; ray, mlflow, optuna and webdataset stay behind (the core never imports them).
# Versions: those pinned in requirements.lock (torchattacks: the one scripts/install.sh installs).
# --no-deps: each wheel's own requirements are on the GPU machine already (checked below against METADATA).
# At the end the script checks that the working tree that travels (tracked files + untracked files git
# does not ignore) plus .whl stays under the device's 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEEL_DIR:-.whl}
LIMIT_MIB=64

pin() {  # the exact version requirements.lock pins for $1 (case-insensitive, - and _ alike)
  local want v
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  v=$(awk -F'==' -v w="$want" '{n=tolower($1); gsub("_", "-", n); if (n == w) print $2}' requirements.lock)
  [ -n "$v" ] || { echo "gpu_wheels: $1 is not pinned in requirements.lock" >&2; exit 2; }
  echo "$v"
}
TORCHATTACKS=$(grep -o 'torchattacks==[0-9.]*' scripts/install.sh | head -1)
[ -n "$TORCHATTACKS" ] || { echo "gpu_wheels: no torchattacks pin in scripts/install.sh" >&2; exit 2; }
WANT=("open_clip_torch==$(pin open_clip_torch)" "ftfy==$(pin ftfy)" "wcwidth==$(pin wcwidth)" "$TORCHATTACKS")

rm -rf "$DEST" && mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WANT[@]}"

# every requirement of every wheel must be on the GPU machine or among these wheels
HAVE="torch torchvision timm huggingface-hub safetensors regex tqdm numpy pillow pyyaml scipy requests \
protobuf packaging filelock fsspec typing-extensions"
for w in "$DEST"/*.whl; do
  for dep in $(unzip -p "$w" '*.dist-info/METADATA' | awk '/^Requires-Dist:/ && !/extra ==/ {print $2}' \
               | sed 's/[<>=!~;(\[].*//' | tr 'A-Z_' 'a-z-'); do
    case " $HAVE $(printf '%s ' "${WANT[@]%%==*}" | tr 'A-Z_' 'a-z-') " in
      *" $dep "*) ;;
      *) echo "gpu_wheels: $(basename "$w") needs $dep, which is neither on the GPU machine nor carried" >&2; exit 1 ;;
    esac
  done
done

whl=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | sort -zu \
        | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((whl + tree))
ls -l "$DEST"
awk -v w="$whl" -v t="$tree" -v l="$LIMIT_MIB" 'BEGIN {
  printf "wheels %.2f MiB + working tree %.2f MiB = %.2f MiB (device limit %d MiB)\n", w/2^20, t/2^20, (w+t)/2^20, l}'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu_wheels: the working tree plus $DEST exceeds ${LIMIT_MIB} MiB: the device would refuse it" >&2
  exit 1
fi
