#!/usr/bin/env bash
# Every GPU-side benchmark in one run, sized for < 10 minutes on one H100/H200,
# with nothing to download on the machine:
#   1. environment (GPU, driver, torch, diffusers)
#   2. peers: the planner (plan:auto, plan:auto:T) next to DeepCache, encoder propagation
#                      and ToMe (bench/peers.py), SD1.5 architecture (random weights), 512²
#                      fp16 DDIM-50 batch 1, 4 prompts x 2 repeats: speed, FLOPs of the whole
#                      call (FlopCounterMode) and PSNR / SSIM to stock (no adherence: random
#                      weights) -> peers.json/.md/.png. The planner's calibration (error model)
#                      is fitted and validated on the GPU in the warm-up (~1 min), its cost
#                      model measured on the GPU by its first call
#   3. speed, eager:   the same model, DDIM-50 and DPM-Solver++-20, batch 1 and 4;
#                      stock / sequential / parallel (encoder propagation, paper schedule)
#   4. speed, compiled: DDIM-50 batch 1 with torch.compile (per block) + channels_last
#   2b. transformers (bench/peers_transformers.py): SD3.5-medium's and FLUX.1-dev's architectures (random
#                      weights) at 512² bf16, 28 steps, 2 prompts: the planner (plan:auto and auto:2, from a
#                      calibration made first within 12 stock images), explicit plans, 14 steps and the paper's
#                      encoder propagation next to diffusers' FirstBlockCache and TaylorSeerCache, time, FLOPs, PSNR
#   5. FLOPs: SD1.5 512², paper schedules (CPU, meta device)
#   6. setup on weights that ship no calibration (bench/setup_cost.py): SD1.5 architecture (random
#                      weights) 512² fp16, the service's budgeted calibration (default 30 stock images
#                      with the warm-up), then the thorough one (script/calibrate's) if the budget allows
#   7. summary tables (speed and FLOPs)
# Results (JSON, markdown summary, this log) go to $OUT if set, else bench/results/.
# Each step has its own timeout and the steps together a budget (BENCH_BUDGET_S, default
# 540 s; the summary adds at most 30 s); results are written after every configuration
# (peers: every repeat), so a step cut short keeps what it measured.
#
# diffusers, DeepCache and tomesd are not installed on the GPU machine (no internet there):
# each that does not import is installed from its wheel in .whl/ into /tmp/site
# (pip --no-index --no-deps), see docs/benchmarks.md; without a DeepCache or tomesd wheel
# the peers step skips those rows (noted in peers.json).
#
#   bench/gpu.sh               the GPU run
#   bench/gpu.sh --cpu-smoke   the same steps at toy sizes on CPU (~1 min; tests/test_bench.py)
set -uo pipefail
export PYTHONUNBUFFERED=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
[ "${BENCH_CPU_SMOKE:-0}" = "1" ] && SMOKE=1

RESULTS=${OUT:-$ROOT/bench/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_log.txt"
exec > >(tee -a "$LOG") 2>&1

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$SMOKE" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi

BUDGET=${BENCH_BUDGET_S:-540}
START=$SECONDS
FAILED=0

# step NAME MAX_SECONDS CMD...: runs CMD under `timeout`, never past the budget; a failure is logged, not fatal.
step() {
    local name=$1 max=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local t=$((max < left ? max : left))
    if [ "$t" -lt 15 ]; then
        echo "=== [$(date -u +%T)] SKIP $name: ${left}s of the ${BUDGET}s budget left"
        FAILED=1
        return 0
    fi
    echo "=== [$(date -u +%T)] $name (timeout ${t}s, $((SECONDS - START))s elapsed)"
    local t0=$SECONDS
    ( set -x; timeout --kill-after=10 "$t" "$@" )
    local rc=$?
    echo "=== [$(date -u +%T)] $name: rc=$rc in $((SECONDS - t0))s"
    [ "$rc" -ne 0 ] && FAILED=1
    return 0
}

echo "=== bench/gpu.sh $([ "$SMOKE" = 1 ] && echo '--cpu-smoke') at $(date -u '+%F %T UTC') on $(hostname); results -> $RESULTS"

# diffusers and the peers from the carried wheels when the machine lacks them (the smoke run uses this checkout's venv)
WHEELS=()
[ "$SMOKE" = 1 ] || for pkg in diffusers DeepCache tomesd; do
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$pkg') is None)" 2>/dev/null && continue
    whl=$(ls "$ROOT"/.whl 2>/dev/null | grep -i "^$pkg-.*\.whl$" | head -n 1)
    if [ -n "$whl" ]; then WHEELS+=("$ROOT/.whl/$whl")
    else echo "=== $pkg does not import and .whl/ has no wheel for it: see docs/benchmarks.md"; fi
done
if [ "${#WHEELS[@]}" -gt 0 ]; then
    step "install wheels" 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${WHEELS[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

[ "$SMOKE" = 0 ] && step "environment" 60 "$PY" -c "
import platform, torch, diffusers, transformers
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'diffusers', diffusers.__version__, 'transformers', transformers.__version__)
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
"
[ "$SMOKE" = 0 ] && command -v nvidia-smi >/dev/null && step "nvidia-smi" 30 nvidia-smi

if [ "$SMOKE" = 1 ]; then
    SPEED=(--device cpu --model toy --resolution 64 --samplers ddim:8,dpmpp:6 --batch 1,2 --repeats 1 --warmup 1 --threads 1)
    MODES=(--modes stock,sequential,parallel,parallel:2)
    OPT=(--channels-last --samplers ddim:8 --batch 1)  # compiling on CPU takes minutes: smoke checks channels_last only
    FLOPS=(--models toy --resolution 64 --schedules paper --device cpu)
    PEERS=(--device cpu --model toy --steps 10 --num-prompts 2 --repeats 2 --warmup 1 --threads 1)
    SETUP=(--weights "$ROOT/weights/tiny-shapes" --threads 1 --no-count)
    TRANSFORMERS=("toy-flux")
    TRANSFORMER_ARGS=(--device cpu --resolution 64 --steps 28 --num-prompts 2 --repeats 1 --threads 1)
    T_TRANSFORMER=400
    T_EAGER=400; T_OPT=400; T_FLOPS=400; T_PEERS=400; T_SETUP=400; T_THOROUGH=0  # hang guards only: ~10 s each on an idle 2-core machine
    BUDGET=${BENCH_BUDGET_S:-1500}
else
    SPEED=(--device cuda --model sd15 --resolution 512 --dtype fp16 --samplers ddim:50,dpmpp:20 --batch 1,4 --repeats 3 --warmup 1)
    MODES=(--modes stock,sequential,parallel,parallel:4)  # parallel:4 = max_parallel 4: the memory/speed trade-off
    OPT=(--compile blocks --compile-dynamic true --channels-last --samplers ddim:50 --batch 1)
    FLOPS=(--models sd15 --schedules paper)
    # 12 methods x (4 prompts x 2 repeats + 1 warm-up + 1 FLOP-counted) calls of ~1 s (stock) or less (~2 min);
    # fitting the planner's error model on 2 captions (~7000 UNet calls of 4 rows or 2 (deep_cfg), most of them
    # deep steps from the forecasting levels' distances, 3 runs of 40 images) and validating it (42 uniform probes
    # and the auto picks, runs of 2 images) ~3 min; 1 call that calibrates fd:auto's schedule; start-up ~30 s
    PEERS=(--device cuda --model sd15 --resolution 512 --dtype fp16 --steps 50 --num-prompts 4 --repeats 2 --warmup 1
           --calibration-prompts 2)
    SETUP=(--model sd15 --no-count)
    # each: building the random weights on the GPU (~20 s), 6 methods x (2 prompts + 1 warm-up + 1 FLOP-counted) calls
    # of ~1-2 s (FLUX.1-dev 512², 28 steps, one call a step with its guidance embedding)
    TRANSFORMERS=("sd35-medium" "flux-dev")
    TRANSFORMER_ARGS=(--device cuda --dtype bf16 --resolution 512 --steps 28 --num-prompts 2 --repeats 1)
    T_TRANSFORMER=200
    # budgeted: saving and loading the random weights (~30 s), 30 stock images (~40 s at ~1.3 s an image), and the
    # reference image timed; thorough: ~4 prompts x 90 stock images, ~8 min: it runs with what the budget leaves
    T_EAGER=120; T_OPT=150; T_FLOPS=60; T_PEERS=420; T_SETUP=150; T_THOROUGH=540
fi
PEER_METHODS=stock,deepcache:2,deepcache:3,deepcache:4,deepcache:5,tome:0.5,fd:uniform:3,fd:auto,plan:auto,plan:auto:2,plan:auto:3,plan:auto:4

# the planner's comparison first, so that a short device lease measures it before anything else
step "peers (planner, DeepCache, ToMe)" "$T_PEERS" "$PY" bench/peers.py "${PEERS[@]}" --methods "$PEER_METHODS" \
    --out "$RESULTS/peers" --plot "$RESULTS/peers.png"
# (plan:FOFO...: half the steps call no model, what two-step Euler segments cost; steps:14 is the stock call at half the steps)
TRANSFORMER_METHODS=fbc:0.1,taylorseer:3,fd:paper,steps:14,plan:auto,plan:auto:2,plan:FOFOFOFOFOFOFOFOFOFOFOFOFOFO,plan:FDDFDDFDDFDDFDDFDDFDDFDDFDDF,plan:FFYYFYYFYYFYYFYYFYYFYYFYYFYY
for arch in "${TRANSFORMERS[@]}"; do
    # (FLUX.1-dev has a guidance embedding: no second call a step, so no C/Y levels to skip it; Y falls back there)
    methods=$TRANSFORMER_METHODS
    [ "$arch" = "flux-dev" ] && methods=fbc:0.1,taylorseer:3,fd:paper,steps:14,plan:auto,plan:auto:2,plan:FOFOFOFOFOFOFOFOFOFOFOFOFOFO,plan:FDDFDDFDDFDDFDDFDDFDDFDDFDDF,plan:FFXXFXXFXXFXXFXXFXXFXXFXXFXX
    step "transformer peers ($arch)" "$T_TRANSFORMER" "$PY" bench/peers_transformers.py --model "$arch" "${TRANSFORMER_ARGS[@]}" \
        --methods "$methods" --out "$RESULTS/peers_$arch"
done
step "speed (eager)" "$T_EAGER" "$PY" bench/speed.py "${SPEED[@]}" "${MODES[@]}" --json "$RESULTS/speed_eager.json"
step "speed (compile + channels_last)" "$T_OPT" "$PY" bench/speed.py "${SPEED[@]}" "${OPT[@]}" --json "$RESULTS/speed_compiled.json"
step "flops" "$T_FLOPS" "$PY" bench/flops.py "${FLOPS[@]}" --json "$RESULTS/flops.json"
step "setup, budgeted calibration" "$T_SETUP" "$PY" bench/setup_cost.py "${SETUP[@]}" --out "$RESULTS/setup_budgeted.json"
[ "$T_THOROUGH" -gt 0 ] && step "setup, thorough calibration" "$T_THOROUGH" "$PY" bench/setup_cost.py "${SETUP[@]}" \
    --budget thorough --out "$RESULTS/setup_thorough.json"
# the summary reads JSON only (no torch import): outside the budget
echo "=== [$(date -u +%T)] summary"
timeout 30 "$PY" bench/summarize.py "$RESULTS" --out "$RESULTS/summary.md" || FAILED=1

echo "=== done in $((SECONDS - START))s; failed steps: $FAILED; files in $RESULTS:"
ls -la "$RESULTS"
exit "$FAILED"
