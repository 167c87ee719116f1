# PaCa-Tiny Mask R-CNN on the synthetic tiny COCO set (detection/make_tiny_coco.py): the full
# pipeline in about a minute on CPU.  Same model, optimizer and evaluation as the COCO config;
# small images (short side 96-128), fewer proposals and RoIs, 2 epochs of 2 iterations, no ImageNet
# download, data loading in the main process.  score_thr=0 keeps the few (low-confidence) detections
# of so short a training, so that the COCO metric always has predictions to evaluate.
_base_ = '../paca_vit/mask_rcnn_1x/mask_rcnn_pacavit_tiny_p2cconv_100_0_mstrain_480_800_1x_coco.py'

import os  # noqa: E402  (after _base_, so that mmengine reads this as a plain config)

# <repo>/datasets/coco_tiny; $PACAVIT_DATASETS replaces <repo>/datasets
data_root = os.path.join(
    os.environ.get('PACAVIT_DATASETS') or os.path.normpath('{{fileDirname}}/../../../datasets'), 'coco_tiny/')

model = dict(
    backbone=dict(init_cfg=None),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100), rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(score_thr=0.0, max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoiceResize', scales=[(96, 192), (128, 192)], keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(192, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=2)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1))
