#!/usr/bin/env bash
# Parameters, GFLOPs, throughput and peak memory of a classifier (benchmark.py); appends a row
# to work_dirs/classification/all_benchmark_results.csv (root: $PACAVIT_WORK_DIRS).
#
#   benchmark.sh model_name img_size num_classes gpu [others]
#
# e.g. ./benchmark.sh pacavit_tiny_p2cconv_100_0 224 1000 0
#      ./benchmark.sh pacavit_tiny_p2cconv_100_0 224 1000 0 --compare --img-sizes 224,448,896
# On CUDA it adds --amp (bfloat16) --channels-last (batch 128, 100 iterations); without CUDA it measures
# fp32 on the CPU with small defaults (batch 8, 5 iterations; change with -b / --iters; add
# --precisions fp32,autocast-bf16,bf16 on a CPU with bfloat16 kernels).  Every model runs in a
# process of its own; --official PATH adds the official implementation's models.
set -euo pipefail
source "$(dirname "$0")/../runtime/launch_common.sh"

if (( $# < 4 )); then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
MODEL=$1 IMG_SIZE=$2 NUM_CLASSES=$3 GPU=$4
shift 4
paca_take_flags "$@"
paca_help_of "$PACAVIT_ROOT/classification/benchmark.py"

paca_select_devices "$GPU" 1
paca_default_omp_waiting  # one process measures at a time
CUDA_ARGS=()
[[ "$PACA_DEVICE" == "cuda" ]] && CUDA_ARGS=(--amp --channels-last)

set -x
"$(paca_python)" "$PACAVIT_ROOT/classification/benchmark.py" --model "$MODEL" --img-size "$IMG_SIZE" \
    --num-classes "$NUM_CLASSES" --device "$PACA_DEVICE" "${CUDA_ARGS[@]}" "${PACA_ARGS[@]}"
