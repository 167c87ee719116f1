# PaCa-Base with a ConvMixer clustering teacher, M=100 in every stage.
# seed: 61.4M params, 372 GFLOPs, box AP 48.3, mask AP 43.3.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_convmixer_base_100_downstream'),
    neck=dict(in_channels=[96, 192, 384, 512]))
