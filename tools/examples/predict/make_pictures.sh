#!/usr/bin/env bash
# The three pictures of the README's "Predict on your own images", on scikit-learn's sample photos.
#
#   tools/examples/predict/make_pictures.sh        (from anywhere; a few minutes on a CPU)
#
# No released weights can be downloaded where this runs, so classification uses random weights
# and detection / segmentation use checkpoints that the tiny pipelines train here first, for a
# few iterations on their synthetic datasets (tiny COCO shapes, tiny ADE20K).  None of the models
# has learned anything about photos: the pictures show what tools/predict.py draws, not what a
# trained PaCa-ViT sees.  Everything but the final PNGs lives in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
OUT=tools/examples/predict
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PACAVIT_DATASETS="$WORK/datasets" PACAVIT_WORK_DIRS="$WORK/work_dirs" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# classification: random weights (seed 0), ImageNet-1k names, the clusters of the last stage with clusters
"$PY" tools/predict.py classify sklearn:china.jpg --model pacavit_tiny_p2cconv_100_0 --clusters --out "$WORK/classify"

# detection: Mask R-CNN trained by the tiny COCO config (2 iterations)
DET_CONFIG=configs/tiny_coco/mask_rcnn_pacavit_tiny_p2cconv_100_0_tiny_coco.py
"$PY" detection/make_tiny_coco.py --out "$WORK/datasets/coco_tiny"
(cd detection && "$PY" train_mmdet.py "$DET_CONFIG" --work-dir "$WORK/detection" \
    --cfg-options randomness.seed=0 val_cfg=None val_dataloader=None val_evaluator=None)
"$PY" tools/predict.py detect sklearn:flower.jpg --config "detection/$DET_CONFIG" \
    --checkpoint "$WORK/detection/epoch_2.pth" --score-thr 0.02 --out "$WORK/detect"

# segmentation: PaCa head trained for 20 iterations on 64x64 crops of the tiny ADE20K
SEG_CONFIG=segmentation/configs/paca_vit/paca_head/pacahead_pacavit_tiny_p2cconv_100_0_512x512_160k_ade20k.py
"$PY" segmentation/make_tiny_ade.py --out "$WORK/datasets/ADEChallengeData2016"
"$PY" segmentation/train_mmseg.py "$SEG_CONFIG" --work-dir "$WORK/segmentation" --cfg-options \
    randomness.seed=0 model.backbone.init_cfg=None "model.data_preprocessor.size=(64,64)" \
    "train_dataloader.dataset.pipeline.2.scale=(128,96)" "train_dataloader.dataset.pipeline.3.crop_size=(64,64)" \
    train_dataloader.num_workers=0 train_dataloader.persistent_workers=False \
    train_cfg.max_iters=20 default_hooks.checkpoint.interval=20 val_cfg=None val_dataloader=None val_evaluator=None
"$PY" tools/predict.py segment sklearn:china.jpg --config "$SEG_CONFIG" \
    --checkpoint "$WORK/segmentation/iter_20.pth" --clusters --out "$WORK/segment"

# 256-colour copies keep the repository small (predict.py itself writes true-colour PNGs)
mkdir -p "$OUT"
"$PY" - "$WORK" "$OUT" <<'EOF'
import sys
from PIL import Image

work, out = sys.argv[1:]
for task, stem in (("classify", "china"), ("detect", "flower"), ("segment", "china")):
    Image.open(f"{work}/{task}/{stem}.png").quantize(256, method=Image.Quantize.FASTOCTREE).save(
        f"{out}/{task}_{stem}.png", optimize=True)
    print(f"{out}/{task}_{stem}.png")
EOF
