# Ablation: PaCa-Small, stage-wise clustering, M=[100,81,64,49].
# seed: 42.0M params, 291 GFLOPs, box AP 46.1, mask AP 41.7.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_100_49_downstream'))
