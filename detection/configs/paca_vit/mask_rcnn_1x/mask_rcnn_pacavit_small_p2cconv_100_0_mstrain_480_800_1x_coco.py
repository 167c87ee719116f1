# PaCa-Small, convolutional clustering, M=[100,100,100,0].
# seed: 41.8M params, 296 GFLOPs, box AP 46.4, mask AP 41.8.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_100_0_downstream'))
