#!/usr/bin/env bash
# The whole GPU training path, checked and timed in a few minutes on one GPU machine.
#
#     bash bench/gpu.sh            # 224 px, 9,866 synthetic images (the team's train set), batch 256
#     bash bench/gpu.sh --tiny     # 32 px, 64 images: checks the script itself (runs on a CPU too)
#
# Needs only python3 with torch, torchvision, numpy, pillow, tqdm (no internet, no matplotlib, no boto3).
# Rows: bf16 autocast and fp16 + GradScaler, channels_last on/off, torch.compile off/on; for each,
# (a) our loop vs (b) the model-only limit; (c) the naive PIL/DataLoader pipeline; batched vs
# one-at-a-time inference; (a) vs (b) per --arch; dss_train.py end to end (also --folds 5). Writes bench/results/gpu-<date>.md (not for --tiny), and $OUT/gpu-bench.md
# when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--tiny" ]]; then
    common=(--image-size 32 --batch-size 16 --num-images 64 --single-predictions 8 --predict-batch-size 32)
    naive=(--batch-size 16 --num-images 64 --naive-workers 2 --naive-steps 2)
    compile_runs=()
    e2e=(--train 64 --test 16 --image-size 32); e2e_train=(--epochs 2 --batch-size 16)
    archs=(convnext_tiny)
else
    common=(--image-size 224 --batch-size 256 --num-images 9866 --single-predictions 200 --predict-batch-size 1024)
    naive=(--batch-size 32 --num-images 2048 --naive-workers 8 --naive-steps 40)
    compile_runs=("--precision bf16 --channels-last true --compile true")
    e2e=(--train 9866 --test 4000 --image-size 224); e2e_train=(--epochs 3 --batch-size 256)
    archs=(resnet50 convnext_tiny efficientnet_v2_s)
fi

report=$(mktemp)
trap 'rm -f "$report"' EXIT
{
    echo "# GPU training path: checks and timings"
    echo
    echo "command: bench/gpu.sh ${*:-}  "
    echo "date: $(date -Iseconds)  "
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /;s/$/  /' || echo "gpu: none (nvidia-smi not found)  "
    "$PYTHON" -c "import torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, cuda available: {torch.cuda.is_available()}  ')"
    echo
} >>"$report"

run() {   # run <label> <bench/train.py args...>: append the table rows, fail loudly on error
    local label=$1; shift
    echo ">>> $label: bench/train.py $*" >&2
    local started=$SECONDS output
    output=$("$PYTHON" bench/train.py "$@")
    echo "$output" >&2
    {
        echo "## $label ($((SECONDS - started)) s)"
        echo
        echo "$output" | sed -n '/^| what/,$p'
        echo
    } >>"$report"
    if [[ -n "${OUT:-}" ]]; then cp "$report" "$OUT/gpu-bench.md"; fi   # partial results survive a timeout
}

run "bf16 autocast, channels_last, eager; with batched inference" "${common[@]}" --precision auto --channels-last true --skip c
run "fp16 + GradScaler, channels_last, eager" "${common[@]}" --precision fp16 --channels-last true --skip c,predict
run "fp32, contiguous, eager" "${common[@]}" --precision fp32 --channels-last false --skip c,predict
for extra in "${compile_runs[@]}"; do
    # shellcheck disable=SC2086
    run "bf16, channels_last, torch.compile (includes no compile time)" "${common[@]}" $extra --skip c,predict
done
run "naive per-sample PIL pipeline (prototype), fp32" "${naive[@]}" --skip a,b,predict
# Throughput per backbone (--arch), bf16 + channels_last, eager: (a) ours vs (b) the model-only limit.
for arch in "${archs[@]}"; do
    run "--arch $arch, bf16 autocast, channels_last, eager" "${common[@]}" --arch "$arch" --precision auto \
        --channels-last true --skip c,predict
done

# End to end: dss_train.py itself on the team's workload size (synthetic pickles, no JPEG decode),
# eager then compiled, then --predict-only with flip TTA. Epoch lines include images/s.
e2e_dir=$(mktemp -d)
trap 'rm -f "$report"; rm -rf "$e2e_dir"' EXIT
train_e2e() {   # train_e2e <label> <dss_train.py args...>
    local label=$1; shift
    echo ">>> $label: dss_train.py $*" >&2
    local started=$SECONDS output
    output=$("$PYTHON" dss_train.py --data-dir "$e2e_dir/data" --weights none "$@" 2>&1) || { echo "$output" >&2; exit 1; }
    echo "$output" >&2
    {
        echo "## $label ($((SECONDS - started)) s wall, including data load)"
        echo
        echo '```'
        echo "$output" | grep -E '^(device|data|split|epoch|test predictions|done)' || true
        echo '```'
        echo
    } >>"$report"
    if [[ -n "${OUT:-}" ]]; then cp "$report" "$OUT/gpu-bench.md"; fi
}
"$PYTHON" bench/synthetic_pickles.py "$e2e_dir/data" "${e2e[@]}" >&2
train_e2e "dss_train.py end to end, eager (bf16 + channels_last on GPU)" --model-dir "$e2e_dir/eager" "${e2e_train[@]}"
train_e2e "dss_train.py end to end, --compile true" --model-dir "$e2e_dir/compiled" --compile true "${e2e_train[@]}"
train_e2e "dss_train.py end to end, --folds 5 (five site-fold members, one job)" --model-dir "$e2e_dir/folds" \
    --folds 5 "${e2e_train[@]}"
train_e2e "dss_train.py --predict-only --tta true" --model-dir "$e2e_dir/eager" --output-dir "$e2e_dir/predict" \
    --predict-only --tta true
"$PYTHON" - "$e2e_dir/predict/test_predictions.csv" >&2 <<'PY'
import sys, pandas as pd
frame = pd.read_csv(sys.argv[1])
sums = frame.drop(columns="id").sum(axis=1)
assert frame["id"].is_unique and (sums - 1).abs().max() < 1e-6, "test_predictions.csv rows must sum to 1"
print(f"checked {sys.argv[1]}: {len(frame)} rows, each sums to 1")
PY

if [[ -n "${OUT:-}" ]]; then cp "$report" "$OUT/gpu-bench.md"; fi
cat "$report"
if [[ "${1:-}" != "--tiny" ]]; then   # a --tiny run checks the script; its numbers are not results
    mkdir -p bench/results
    result="bench/results/gpu-$(date +%Y-%m-%d).md"
    cp "$report" "$result"
    echo "saved $result" >&2
fi
