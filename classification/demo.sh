#!/usr/bin/env bash
# The main-job demo: PaCa-Tiny trained from scratch on the bundled handwritten digits, then validated.
#
#   classification/demo.sh [Tag] [others for train_timm.py, e.g. --epochs 3]
#
# 1. exports scikit-learn's digits to datasets/DIGITS (once; no network),
# 2. trains through train_timm.sh with configs/digits_demo.yml (32x32, 10 epochs; GPU 0 if CUDA is
#    visible, else one CPU process), resuming an interrupted run of the same Tag,
# 3. validates the final weights with validate.sh.
# A rerun with a finished Tag skips training and validates it again; pass a new Tag to retrain.
# WORKERS (default 0: decoding 32x32 PNGs in the training process is cheaper than a worker) sets the
# data-loading processes per training process.
set -euo pipefail
CLS_DIR="$(cd "$(dirname "$0")" && pwd)"
source "$CLS_DIR/../runtime/launch_common.sh"

TAG="${1:-demo}"
(( $# )) && shift
MODEL=pacavit_tiny_p2cconv_100_0 DATASET=DIGITS IMG_SIZE=32 EXP=demo
DONE_DIR="$(paca_run_dir classification "$EXP" "${DATASET}_${IMG_SIZE}_${MODEL}" "$TAG")"

"$(paca_python)" "$CLS_DIR/make_digits_dataset.py"
# a finished Tag is not retrained (train_timm.sh says so and returns 0); an interrupted one resumes
"$CLS_DIR/train_timm.sh" configs/digits_demo.yml "$MODEL" "$DATASET" "$IMG_SIZE" 0 1 "$EXP" "$TAG" 0 1 \
    "${WORKERS:-0}" "" "$@"  # port: MASTER_PORT, else a free one
"$CLS_DIR/validate.sh" "$MODEL" "$DONE_DIR/last.pth.tar" "$DATASET" "$IMG_SIZE" 0 1 --crop-pct 1.0
echo "training curves: $DONE_DIR/training_curves.png"
