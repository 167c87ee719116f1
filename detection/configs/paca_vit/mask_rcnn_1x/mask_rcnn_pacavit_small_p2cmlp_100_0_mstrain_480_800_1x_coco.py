# PaCa-Small, MLP clustering, M=[100,100,100,0].
# seed: 42.4M params, 303 GFLOPs, box AP 46.6, mask AP 41.9.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cmlp_100_0_downstream'))
