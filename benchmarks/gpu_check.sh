#!/usr/bin/env bash
# The first real run on a GPU, in ONE device call: GPU tests, then the step and TAPT benchmarks.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine; ~5 min expected, 7.75 min cap
#   GPU_CHECK_DEVICE=cpu OUT=/tmp/gc bash benchmarks/gpu_check.sh   # CPU dry run: capt-tiny, tiny sizes
#
# Needs the wheels of benchmarks/gpu_wheels.sh in ./.whl (carried to the GPU machine: see
# benchmarks/README.md, "GPU", for the exact device call). Stages, each under its own time limit so that
# a hang costs only its stage; a failed stage does not stop the next ones:
#   wheels    install .whl/*.whl into /tmp/site (the device README's exact pip command)         30 s
#   env       imports, versions, GPU, measured bf16 matmul ceiling                               45 s
#   tests     pytest -m gpu tests/test_gpu*.py (ViT-B/16, random weights; 45 s per test at most) 120 s
#   step      bench_step.py eager: ViT-B/16 CAPT PGD-2 bf16 batch 32, MFU, memory, largest batch 90 s
#   compiled  bench_step.py with regional torch.compile (most of it is compiling)               120 s
#   tapt      bench_tapt.py ViT-B/16, 64 views: ms per image, batched vs one by one, fp32 + bf16   60 s
# Every figure lands as JSON in $OUT (at most 8 files, flat): env.json, tests.xml, step.json,
# compiled.json, tapt_fp32.json, tapt_bf16.json, summary.json, log.txt; summary.json holds each stage's
# status and the headline figures, also printed last. GPU_CHECK_STAGES="tests tapt" reruns some stages.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT=${OUT:-benchmarks/results/gpu_check}
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
STAGES=${GPU_CHECK_STAGES:-wheels env tests step compiled tapt}
SCALE=${GPU_CHECK_TIME_SCALE:-1}  # multiplies every stage's limit (a loaded CPU dry run needs more)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
: >"$LOG"
STATE=$(mktemp)  # per-stage status, folded into summary.json (not a file of its own: $OUT holds <= 8)
echo "{}" >"$STATE"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PY SITE

if [ "$DEVICE" = cuda ]; then
  MODEL=ViT-B-16; BATCH=32; FIT="32 64"; ROUNDS=5; MINSEC=0.2; THREADS=8; MARK=gpu
  TAPT=(--classes 100 --images 16 --views 64 --tau 0.1 --batch-sizes 1 8 16 --repeats 2)
else  # dry run: the same commands on capt-tiny with tiny sizes (checks the script, not the GPU)
  MODEL=capt-tiny; BATCH=4; FIT="4 8"; ROUNDS=1; MINSEC=0; THREADS=1; MARK="not gpu and not slow"
  TAPT=(--classes 10 --images 4 --views 8 --tau 0.25 --batch-sizes 1 4 --repeats 1)
fi

stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, log it, record status and duration
  local name=$1 limit=$(( $2 * SCALE )) t0 rc status
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  echo "=== $name: $status (rc $rc, $(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
  "$PY" - "$STATE" "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$limit" <<'EOF'
import json, sys
path, name, status, rc, secs, limit = sys.argv[1:]
doc = json.load(open(path))
doc[name] = {"status": status, "rc": int(rc), "seconds": int(secs), "limit_s": int(limit)}
json.dump(doc, open(path, "w"), indent=1)
EOF
}

# shellcheck disable=SC2016
stage wheels 30 bash -c 'ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: run benchmarks/gpu_wheels.sh"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl'
stage env 45 "$PY" benchmarks/gpu_env.py --device "$DEVICE" --out "$OUT/env.json"
# cuda: the gpu-marked tests; the CPU dry run: the CPU halves of the same tests
# -v: each test's verdict reaches log.txt as it ends; -o timeout: pytest-timeout (on the GPU machine) stops a
# hanging test, not the stage, so tests.xml is still written
stage tests 120 "$PY" -m pytest -v -p no:cacheprovider -o timeout=$((45 * SCALE)) -m "$MARK" \
  tests/test_gpu.py tests/test_gpu_attacks.py -rs --junitxml="$OUT/tests.xml"
STEP=(benchmarks/bench_step.py --model "$MODEL" --device "$DEVICE" --amp --batch "$BATCH" --classes 100
      --steps 2 --objectives capt --rounds "$ROUNDS" --min-seconds "$MINSEC" --threads "$THREADS"
      --peak-tflops 790 --profile-below 0.35)
# shellcheck disable=SC2086
stage step 90 "$PY" "${STEP[@]}" --compile off --max-batch --fit-sizes $FIT --out "$OUT/step.json"
stage compiled 120 "$PY" "${STEP[@]}" --compile on --no-components --fused-only --out "$OUT/compiled.json"
stage tapt 60 bash -c "$PY benchmarks/bench_tapt.py --model $MODEL --device $DEVICE ${TAPT[*]} \
  --threads $THREADS --out $OUT/tapt_fp32.json && \
  $PY benchmarks/bench_tapt.py --model $MODEL --device $DEVICE ${TAPT[*]} --threads $THREADS --amp \
  --no-sequential --out $OUT/tapt_bf16.json"
"$PY" benchmarks/gpu_summary.py "$OUT" "$STATE" | tee -a "$LOG"
rc=$?
rm -f "$STATE"
exit $rc
