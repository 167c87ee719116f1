#!/usr/bin/env bash
# Evaluate a segmentation checkpoint (mIoU) on 1..N GPUs (or CPU processes when no GPU is visible).
#
#   ./test_mmseg.sh config checkpoint gpus nb_gpus port [others]
#
#   ./test_mmseg.sh configs/paca_vit/paca_head/pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py \
#       https://github.com/iVMCL/PaCaViT/releases/download/pacavit/pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.pth \
#       0 1 23900
#
# The checkpoint is a file or a URL (downloaded once into the cache).  The config path is relative
# to this folder or to the working directory.  [others] go to test_mmseg.py: --show-dir DIR (PNG
# visualisations), --work-dir DIR (logs; default work_dirs/segmentation/test/<config name>),
# --cfg-options KEY=VALUE ...
set -euo pipefail
source "$(dirname "$0")/../tools/launch_common.sh"

[[ $# -ge 5 ]] || paca_die "usage: $0 config checkpoint gpus nb_gpus port [others]"
SEG_DIR="$PACAVIT_ROOT/segmentation"
CONFIG="$1" CHECKPOINT="$2" GPUS="$3" NB_GPUS="$4" PORT="$5"
shift 5
paca_take_flags "$@"

[[ -f "$CONFIG" ]] || CONFIG="$SEG_DIR/$CONFIG"
[[ -f "$CONFIG" ]] || paca_die "config not found: $1 (relative to $(pwd) or $SEG_DIR)"

paca_select_devices "$GPUS" "$NB_GPUS"
paca_torchrun "$PORT" "$SEG_DIR/test_mmseg.py" "$CONFIG" "$CHECKPOINT" "${PACA_ARGS[@]}"
