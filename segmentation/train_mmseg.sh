#!/usr/bin/env bash
# Train a segmentor on 1..N GPUs (or CPU processes when no GPU is visible).
#
#   ./train_mmseg.sh Relative_config_filename Remove_old_if_exist_0_or_1 Exp_name Tag gpus nb_gpus port [others]
#
#   ./train_mmseg.sh configs/paca_vit/paca_head/pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py \
#       1 cvpr23 try1 0,1,2,3,4,5,6,7 8 23900
#
# The config path is relative to this folder or to the working directory.  Results go to
# work_dirs/segmentation/<Exp_name>/<config name>_<Tag>/ (root: $PACAVIT_WORK_DIRS).  Remove_old=1
# deletes an unfinished run of the same name (only with --yes or PACAVIT_YES=1; never prompts),
# Remove_old=0 resumes it from its newest intact checkpoint; a finished run is never touched.
# One launcher per run folder: a second one on the same Exp_name/Tag stops at once, naming the
# first.  Exp_name and Tag are folder names (no '/'; a trailing one is dropped).
# [others] go to train_mmseg.py (--cfg-options KEY=VALUE ..., --amp, --auto-scale-lr, --resume CKPT).
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node, with one shared
# work dir; node 0 owns the run folder (lock, removal), rank 0 of the training picks the checkpoint
# to resume from and writes the FINISHED mark.  SIGTERM saves a checkpoint.  MASTER_PORT, when set,
# overrides the port argument.
set -euo pipefail
source "$(dirname "$0")/../runtime/launch_common.sh"

paca_openmmlab_train segmentation train_mmseg.py "$@"
