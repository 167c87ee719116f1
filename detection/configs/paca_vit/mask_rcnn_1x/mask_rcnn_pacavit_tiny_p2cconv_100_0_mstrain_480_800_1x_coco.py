# PaCa-Tiny, convolutional clustering, M=[100,100,100,0].
# seed: 32.0M params, 252 GFLOPs, box AP 43.3, mask AP 39.6.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_tiny_p2cconv_100_0_downstream',
        drop_path_rate=0.1))
