#!/usr/bin/env bash
# Every figure of the README's Performance section in one command (one benchmark.py run):
#
#   speed_report.sh gpu [others]        gpu: the CUDA device index (any value on a CPU-only machine)
#
# CPU: fp32, batch 8 at 224, PaCa-Tiny/Small/Base against convnext_tiny in 8 interleaved rounds
#      (each model keeps its fastest: this shared machine drifts by up to 20% within minutes);
#      PaCa's inference is measured with its fused kernels and with the plain PyTorch ops.
# CUDA: bf16 autocast, channels_last, batch 128, PaCa-Tiny/Small/Base against convnext_tiny/small/
#       base and swin_tiny, each model eager and torch.compile'd.
# Both then time the backbones of PaCa-Tiny, pvt_v2_b1 and convnext_tiny at batch 1 from 224 to 896.
# Appends the rows to work_dirs/classification/all_benchmark_results.csv and draws efficiency.png
# and latency_vs_resolution.png next to it.  [others] go to benchmark.py (e.g. --rounds 2).
set -euo pipefail
source "$(dirname "$0")/../tools/launch_common.sh"

if (( $# < 1 )); then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
GPU=$1
shift
paca_select_devices "$GPU" 1 >/dev/null

TINY=pacavit_tiny_p2cconv_100_0
PACA_PEERS=pacavit_small_p2cconv_100_0,pacavit_base_p2cconv_100_0
if [[ "$PACA_DEVICE" == "cuda" ]]; then
    RUN=(--peers "$PACA_PEERS,convnext_tiny,convnext_small,convnext_base,swin_tiny_patch4_window7_224"
         --compile-modes both --rounds 2)
else
    RUN=(--peers "$PACA_PEERS,convnext_tiny" --iters 3 --warmup 1 --rounds 8 --fused-kernels both)
fi
exec "$(dirname "$0")/benchmark.sh" "$TINY" 224 1000 "$GPU" --compare "${RUN[@]}" \
    --img-sizes 224,448,896 --curve-models "$TINY,pvt_v2_b1,convnext_tiny" "$@"
