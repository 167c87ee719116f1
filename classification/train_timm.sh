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
# moved to .../<Exp>/TrainingFinished/<same name>/ when training completes; a finished run is
# never retrained (Remove_old=0: nothing to do, exit 0; Remove_old=1: refused).  Remove_old=1
# deletes an unfinished run only with --yes (or PACAVIT_YES=1); Resume=1 continues it from its
# newest intact checkpoint (last.pth.tar unless that is corrupt), random state included, so the
# result is that of an uninterrupted run.  One launcher per run folder: a second one on the same
# run stops at once, naming the first.  Dataset_name/Exp_name/Tag are folder names (no '/').
# The launcher never prompts.
# [others] go to train_timm.py and override the config (e.g. --epochs 10 -b 64 --lr 1e-3).
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node.
set -euo pipefail
source "$(dirname "$0")/../runtime/launch_common.sh"

if (( $# < 12 )); then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
CONFIG=$1 MODEL=$2 IMG_SIZE=$4 REMOVE_OLD=$5 RESUME=$6
GPUS=$9 NB_GPUS=${10} WORKERS=${11} PORT=${12}
paca_check_name Dataset_name "$3" && DATASET="$PACA_NAME"
paca_check_name Exp_name "$7" && EXP="$PACA_NAME"
paca_check_name Tag "$8" && TAG="$PACA_NAME"
shift 12
paca_take_flags "$@"

CLS_DIR="$PACAVIT_ROOT/classification"
[[ -f "$CONFIG" ]] || CONFIG="$CLS_DIR/$CONFIG"
[[ -f "$CONFIG" ]] || paca_die "config file $1 not found (relative to $(pwd) or $CLS_DIR)"
[[ "$IMG_SIZE" =~ ^[0-9]+$ ]] || paca_die "Img_size must be an integer, got '$IMG_SIZE'"
[[ "$REMOVE_OLD" == [01] && "$RESUME" == [01] ]] || paca_die "Remove_old and Resume must be 0 or 1, got '$REMOVE_OLD' '$RESUME'"
DATA_DIR="${PACAVIT_DATASETS:-$PACAVIT_ROOT/datasets}/$DATASET"
[[ -d "$DATA_DIR/train" && -d "$DATA_DIR/val" ]] || paca_die "dataset folder $DATA_DIR/{train,val} not found. \
Link your data there (see datasets/README.md), or for the bundled digits run: python classification/make_digits_dataset.py"

EXP_DIR="${PACAVIT_WORK_DIRS:-$PACAVIT_ROOT/work_dirs}/classification/$EXP"
NAME="${DATASET}_${IMG_SIZE}_${MODEL}_${TAG}"
RUN_DIR="$EXP_DIR/$NAME"
DONE_DIR="$EXP_DIR/TrainingFinished/$NAME"

# a finished run is never retrained: nothing to do (Remove_old=0) or refused (Remove_old=1)
if [[ -e "$DONE_DIR" ]]; then
    [[ "$REMOVE_OLD" == "1" ]] && paca_die "$NAME has already finished training and is kept: $DONE_DIR. \
It is never retrained or overwritten; choose another Tag, or delete that folder by hand to train again."
    echo "$NAME has already finished training: $DONE_DIR; nothing to do (it is never retrained)"
    exit 0
fi
paca_check_nodes
# Node 0 owns the run folder (shared by all nodes) and its lock; every node makes the same resume decision.
if [[ "${NODE_RANK:-0}" == "0" ]]; then
    paca_lock_run "$RUN_DIR"
    if paca_run_has_content "$RUN_DIR"; then
        if [[ "$REMOVE_OLD" == "1" ]]; then
            paca_confirm_remove "$RUN_DIR"
        elif [[ "$RESUME" != "1" ]]; then
            paca_die "$RUN_DIR exists: pass Resume=1 to continue it or Remove_old=1 to start over"
        fi
    fi
fi
RESUME_ARGS=()
if [[ "$REMOVE_OLD" == "0" && "$RESUME" == "1" ]]; then
    RESUME_FROM="$(paca_resume_point classification "$RUN_DIR")" || exit 2
    if [[ -n "$RESUME_FROM" ]]; then
        RESUME_ARGS=(--resume "$RESUME_FROM")
    elif paca_run_has_content "$RUN_DIR"; then
        echo "note: $RUN_DIR has no checkpoint yet; starting from scratch there"
    fi
fi
mkdir -p "$RUN_DIR"

paca_select_devices "$GPUS" "$NB_GPUS"
CUDA_ARGS=()
[[ "$PACA_DEVICE" == "cuda" ]] && CUDA_ARGS=(--channels-last --pin-mem)

if ! paca_torchrun "$PORT" "$CLS_DIR/train_timm.py" -c "$CONFIG" --model "$MODEL" --data-dir "$DATA_DIR" \
    --img-size "$IMG_SIZE" --workers "$WORKERS" --output "$RUN_DIR" --device "$PACA_DEVICE" \
    "${CUDA_ARGS[@]}" "${RESUME_ARGS[@]}" "${PACA_ARGS[@]}"; then
    paca_training_failed classification "$RUN_DIR" "continue it with Resume=1 (Remove_old=0)"
fi

if [[ "${NODE_RANK:-0}" == "0" ]]; then
    mkdir -p "$EXP_DIR/TrainingFinished"
    mv "$RUN_DIR" "$DONE_DIR"
    echo "training finished: $DONE_DIR"
fi
