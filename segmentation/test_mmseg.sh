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
# --cfg-options KEY=VALUE ...  MASTER_PORT, when set, overrides the port argument, as in every launcher.
set -euo pipefail
source "$(dirname "$0")/../runtime/launch_common.sh"

paca_openmmlab_test segmentation test_mmseg.py "$@"
