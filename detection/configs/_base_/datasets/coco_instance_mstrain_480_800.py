# COCO instance segmentation with the DETR-style multi-scale training augmentation: the short side
# is drawn from 480..800 (step 32, long side <= 1333), or the image is first resized to a short side
# of 400/500/600, randomly cropped to 384..600 pixels, and then resized as above.
_base_ = 'mmdet::_base_/datasets/coco_instance.py'

import os  # noqa: E402  (after _base_, so that mmengine reads this as a plain config)

# <repo>/datasets/coco, whatever the working directory; $PACAVIT_DATASETS replaces <repo>/datasets
data_root = os.path.join(
    os.environ.get('PACAVIT_DATASETS') or os.path.normpath('{{fileDirname}}/../../../../datasets'), 'coco/')

multi_scale = [(short, 1333) for short in range(480, 801, 32)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True)],
            [
                dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
                dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True),
            ],
        ]),
    dict(type='PackDetInputs'),
]

train_dataloader = dict(dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
