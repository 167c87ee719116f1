# Ablation: PaCa-Small, stage-wise clustering, M=[49,64,81,100].
# seed: 42.0M params, 289 GFLOPs, box AP 46.1, mask AP 41.5.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_49_100_downstream'))
