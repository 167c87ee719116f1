# Ablation: PaCa-Small, stage-wise clustering, M=[100,100,100,100].
# seed: 42.0M params, 294 GFLOPs, box AP 46.4, mask AP 41.8.
# The seed links this row's ImageNet weights to the [100,81,64,49] file; its clustering layers of other
# sizes are re-initialised when loading.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_100_downstream'))
