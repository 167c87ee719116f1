#!/usr/bin/env bash
# Top-1 / top-5 accuracy on datasets/<dataset_name>/val with validate.py under torchrun.
#
#   validate.sh model_name checkpoint_file dataset_name img_size gpus num_gpus [others]
#
# checkpoint_file: a local file, a URL, or 'pretrained' (the released ImageNet weights).
# e.g. ./validate.sh pacavit_tiny_p2cconv_100_0 pretrained IMNET 224 0 1
#      ./validate.sh pacavit_tiny_p2cconv_100_0 ../work_dirs/classification/cvpr23/IMNET_224_pacavit_tiny_p2cconv_100_0_try1/model_best.pth.tar IMNET 224 0,1 2
# [others] go to validate.py (e.g. --use-ema, --crop-pct 1.0, --results-file r.json).
# $PACAVIT_DATASETS replaces the datasets/ root; MASTER_PORT picks the rendezvous port (default: a free one).
set -euo pipefail
source "$(dirname "$0")/../runtime/launch_common.sh"

if (( $# < 6 )); then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
MODEL=$1 CHECKPOINT=$2 DATASET=$3 IMG_SIZE=$4 GPUS=$5 NB_GPUS=$6
shift 6
paca_take_flags "$@"
paca_help_of "$PACAVIT_ROOT/classification/validate.py"

DATA_DIR="${PACAVIT_DATASETS:-$PACAVIT_ROOT/datasets}/$DATASET"
[[ -d "$DATA_DIR/val" ]] || paca_die "dataset folder $DATA_DIR/val not found. \
Link your data there (see datasets/README.md), or for the bundled digits run: python classification/make_digits_dataset.py"
# a relative checkpoint path means relative to where the user is, not to the script
if [[ "$CHECKPOINT" != "pretrained" && "$CHECKPOINT" != *://* && -e "$CHECKPOINT" ]]; then
    CHECKPOINT="$(cd "$(dirname "$CHECKPOINT")" && pwd)/$(basename "$CHECKPOINT")"
fi

paca_select_devices "$GPUS" "$NB_GPUS"
CUDA_ARGS=()
[[ "$PACA_DEVICE" == "cuda" ]] && CUDA_ARGS=(--pin-mem --channels-last --amp --workers 8)

VALIDATE_ARGS=(--model "$MODEL" --checkpoint "$CHECKPOINT" --data-dir "$DATA_DIR" --img-size "$IMG_SIZE"
               --device "$PACA_DEVICE" "${CUDA_ARGS[@]}" "${PACA_ARGS[@]}")
# the script's own checks of the command (options, the model name, --amp on this device, the split;
# one process, a few seconds), so that a mistake is one error line before torchrun starts
"$(paca_python)" "$PACAVIT_ROOT/classification/validate.py" "${VALIDATE_ARGS[@]}" --check-args || exit 2
paca_torchrun "" "$PACAVIT_ROOT/classification/validate.py" "${VALIDATE_ARGS[@]}" || paca_evaluation_failed $?
