# Everything the PaCa-ViT Mask R-CNN configs share; each file in paca_vit/mask_rcnn_1x/ only names
# its backbone.
_base_ = [
    'models/mask_rcnn_pacavit_fpn.py',
    'datasets/coco_instance_mstrain_480_800.py',
    'schedules/adamw_1x.py',
    'mmdet::_base_/default_runtime.py',
]
# The official launcher trains with --auto-scale-lr: lr x (GPUs x images per GPU) / 16.
auto_scale_lr = dict(enable=True, base_batch_size=16)
