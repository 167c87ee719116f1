# Ablation: PaCa-Small, stage-wise clustering, M=[49,49,49,0].
# seed: 41.8M params, 289 GFLOPs, box AP 46.2, mask AP 41.6.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_49_0_downstream'))
