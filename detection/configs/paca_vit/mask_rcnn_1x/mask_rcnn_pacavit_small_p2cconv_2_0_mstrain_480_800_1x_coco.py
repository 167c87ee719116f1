# Ablation: PaCa-Small, stage-wise clustering, M=[2,2,2,0].
# seed: 41.6M params, 283 GFLOPs, box AP 45.5, mask AP 41.1.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_2_0_downstream'))
