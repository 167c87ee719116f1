# Ablation: PaCa-Small, block-wise clustering, M=[100,100,100,100].
# seed: 44.0M params, 304 GFLOPs, box AP 46.5, mask AP 41.8.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_100_blockwise_downstream'))
