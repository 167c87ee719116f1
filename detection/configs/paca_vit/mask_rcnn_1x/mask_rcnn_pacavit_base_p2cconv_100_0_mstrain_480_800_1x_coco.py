# PaCa-Base, convolutional clustering, M=[100,100,100,0].
# seed: 66.6M params, 373 GFLOPs, box AP 48.0, mask AP 42.9.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_base_p2cconv_100_0_downstream'),
    neck=dict(in_channels=[96, 192, 384, 512]))
