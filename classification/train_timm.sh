#!/usr/bin/env bash
# Train an ImageNet-style classifier with train_timm.py under torchrun.
#
#   train_timm.sh Config_file Model_name Dataset_name Img_size Remove_old_if_exist_0_or_1 \
#                 Resume_or_not_if_exist Exp_name Tag Gpus Nb_gpus Workers Port [others]
#
# e.g. ./train_timm.sh configs/imagenet_vit_adamw.yml pacavit_tiny_p2cconv_100_0 IMNET 224 1 1 cvpr23 try1 0,1,2,3,4,5,6,7 8 8 23900
#
# Data: datasets/<Dataset_name>/{train,val} (root overridable with $PACAVIT_DATASETS).
# Output: work_dirs/classification/<Exp>/<Dataset>_<Img>_<Model>_<Tag>/ (root: $PACAVIT_WORK_DIRS),
# marked FINISHED by train_timm.py when training completes; a finished run is never retrained
# (Remove_old=0: nothing to do, exit 0; Remove_old=1: refused).  Remove_old=1 deletes an
# unfinished run only with --yes (or PACAVIT_YES=1); Resume=1 continues it from its newest intact
# checkpoint (chosen by rank 0 for every process), random state included, so the result is that of
# an uninterrupted run.  One launcher per run folder: a second one on the same run stops at once,
# naming the first.  Dataset_name/Exp_name/Tag are folder names (no '/').  Never prompts.
# [others] go to train_timm.py and override the config (e.g. --epochs 10 -b 64 --lr 1e-3).
# Port: the rendezvous port; MASTER_PORT, when set, overrides it (as in every launcher).
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node.
set -euo pipefail
source "$(dirname "$0")/../runtime/launch_common.sh"

if (( $# < 12 )); then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
CONFIG=$1 MODEL=$2 IMG_SIZE=$4 REMOVE_OLD=$5 RESUME=$6
GPUS=$9 NB_GPUS=${10} WORKERS=${11} PORT=${12}
paca_check_name Dataset_name "$3" && DATASET="$PACA_NAME"
paca_check_name Exp_name "$7" && EXP="$PACA_NAME"
paca_check_name Tag "$8" && TAG="$PACA_NAME"
shift 12
paca_take_flags "$@"
paca_help_of "$PACAVIT_ROOT/classification/train_timm.py"

CLS_DIR="$PACAVIT_ROOT/classification"
[[ -f "$CONFIG" ]] || CONFIG="$CLS_DIR/$CONFIG"
[[ -f "$CONFIG" ]] || paca_die "config file $1 not found (relative to $(pwd) or $CLS_DIR)"
[[ "$IMG_SIZE" =~ ^[0-9]+$ ]] || paca_die "Img_size must be an integer, got '$IMG_SIZE'"
DATA_DIR="${PACAVIT_DATASETS:-$PACAVIT_ROOT/datasets}/$DATASET"
[[ -d "$DATA_DIR/train" && -d "$DATA_DIR/val" ]] || paca_die "dataset folder $DATA_DIR/{train,val} not found. \
Link your data there (see datasets/README.md), or for the bundled digits run: python classification/make_digits_dataset.py"

paca_check_nodes
RUN_DIR="$(paca_run_dir classification "$EXP" "${DATASET}_${IMG_SIZE}_${MODEL}" "$TAG")"
TRAIN_ARGS=(-c "$CONFIG" --model "$MODEL" --data-dir "$DATA_DIR" --img-size "$IMG_SIZE" --workers "$WORKERS"
            --output "$RUN_DIR")
RESUME_ARGS=()
[[ "$RESUME" == 1 ]] && RESUME_ARGS=(--auto-resume)
# the script's own checks of the command (options, the YAML config, the model name; one process,
# ~5 s), so that a mistake is one error line before the run folder is made or torchrun starts
"$(paca_python)" "$CLS_DIR/train_timm.py" "${TRAIN_ARGS[@]}" "${RESUME_ARGS[@]}" "${PACA_ARGS[@]}" --check-args ||
    exit 2
paca_prepare_experiment "$RUN_DIR" "$REMOVE_OLD" "$RESUME"

paca_select_devices "$GPUS" "$NB_GPUS"
CUDA_ARGS=()
[[ "$PACA_DEVICE" == "cuda" ]] && CUDA_ARGS=(--channels-last --pin-mem)

if ! paca_torchrun "$PORT" "$CLS_DIR/train_timm.py" "${TRAIN_ARGS[@]}" --device "$PACA_DEVICE" \
    "${CUDA_ARGS[@]}" "${RESUME_ARGS[@]}" "${PACA_ARGS[@]}"; then
    paca_training_failed classification "$RUN_DIR" "continue it with Resume=1 (Remove_old=0)"
fi
paca_training_done "$RUN_DIR"
