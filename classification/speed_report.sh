#!/usr/bin/env bash
# Every figure of classification/PERFORMANCE.md in one command (one benchmark.py run):
#
#   speed_report.sh gpu [others]        gpu: the CUDA device index (any value on a CPU-only machine)
#
# Every model is measured in a process of its own, in rounds interleaved over the processes of the
# rows compared with one another (same precision); rows give the median and spread over the rounds
# and name the host (CPU model, ISA, threads, OpenMP waiting, malloc setting, versions).  OpenMP
# waits its default way (a brief spin, then sleep) unless you set OMP_WAIT_POLICY.
# With $PACAVIT_OFFICIAL pointing at a checkout of https://github.com/iVMCL/PaCaViT, the official
# PaCa models are measured beside these (inference); without it their rows are skipped.
# CPU: batch 8 at 224, 5 rounds of at least 5 batches and 2 s (training: 3 steps).  fp32:
#      PaCa-Tiny/Small/Base, with the fused kernels and with the plain PyTorch ops, against
#      convnext_tiny, inference and training.  Where the CPU has bfloat16 kernels (AVX-512 BF16
#      or AMX): PaCa-Tiny/Small and convnext_tiny inference under bf16 autocast and as bf16 models
#      too.  16-21 minutes on 2 Zen 5 cores, 22 on 2 Zen 4 ones, 12.5-14 on 2 AMX Xeon ones, with the official rows.  Run it twice, then
#      classification/benchmark_agreement.py says how far the two runs agree, row by row.
# CUDA: bf16 autocast, channels_last, batch 128, PaCa-Tiny/Small/Base against convnext_tiny/small/
#       base and swin_tiny, each model eager and torch.compile'd.
# Both then time the backbones of PaCa-Tiny, pvt_v2_b1 and convnext_tiny at batch 1 from 224 to 896
# in as many interleaved rounds (latency_vs_resolution.csv: median, min and max per point).
# Appends the rows to work_dirs/classification/all_benchmark_results.csv and draws efficiency.png
# and latency_vs_resolution.png next to it.  [others] go to benchmark.py (e.g. --rounds 2).
set -euo pipefail
source "$(dirname "$0")/../runtime/launch_common.sh"

if (( $# < 1 )); then
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
GPU=$1
shift
paca_select_devices "$GPU" 1 >/dev/null
paca_default_omp_waiting  # as benchmark.sh: one process measures at a time

TINY=pacavit_tiny_p2cconv_100_0
SMALL=pacavit_small_p2cconv_100_0
if [[ "$PACA_DEVICE" == "cuda" ]]; then
    RUN=(--peers "$SMALL,pacavit_base_p2cconv_100_0,convnext_tiny,convnext_small,convnext_base,swin_tiny_patch4_window7_224"
         --compile-modes both --rounds 2)
else
    # the bf16 rows where the CPU has bfloat16 kernels (benchmark.py skips them with a note elsewhere)
    RUN=(--peers "$SMALL,pacavit_base_p2cconv_100_0,convnext_tiny" --iters 5 --train-iters 3 --min-round-seconds 2 --warmup 1 --rounds 5
         --fused-kernels both --precisions fp32,autocast-bf16,bf16 --low-precision-models "$TINY,$SMALL,convnext_tiny")
fi
exec "$(dirname "$0")/benchmark.sh" "$TINY" 224 1000 "$GPU" --compare "${RUN[@]}" --img-sizes 224,448,896 --curve-models "$TINY,pvt_v2_b1,convnext_tiny" "$@"
