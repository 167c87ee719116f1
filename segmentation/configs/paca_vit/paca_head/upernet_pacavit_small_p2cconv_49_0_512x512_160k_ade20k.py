# Ablation: PaCa-Small, stage-wise [49,49,49,0] clusters on ImageNet, + PaCa head (seed file name
# upernet_*, PaCa head model). Seed table: 23.4M, 47.3 GFLOPs, 47.8 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_49_0_downstream'))
