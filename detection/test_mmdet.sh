#!/usr/bin/env bash
# Evaluate a detection checkpoint (COCO bbox and segm mAP) on 1..N GPUs (or CPU processes when no
# GPU is visible).
#
#   ./test_mmdet.sh config checkpoint gpus nb_gpus port [others]
#
#   ./test_mmdet.sh configs/paca_vit/mask_rcnn_1x/mask_rcnn_pacavit_tiny_p2cconv_100_0_mstrain_480_800_1x_coco.py \
#       https://github.com/iVMCL/PaCaViT/releases/download/pacavit/mask_rcnn_pacavit_tiny_p2cconv_100_0_mstrain_480_800_1x_coco.pth \
#       0 1 23900
#
# The checkpoint is a file or a URL (downloaded once into the cache).  The config path is relative
# to this folder or to the working directory.  [others] go to test_mmdet.py: --show-dir DIR (one PNG
# of the predicted boxes and masks per image), --work-dir DIR (logs; default
# work_dirs/detection/test/<config name>), --cfg-options KEY=VALUE ...  MASTER_PORT, when set,
# overrides the port argument, as in every launcher.
set -euo pipefail
source "$(dirname "$0")/../runtime/launch_common.sh"

paca_openmmlab_test detection test_mmdet.py "$@"
