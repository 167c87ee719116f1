# Ablation: PaCa-Small, stage-wise [49,64,81,100] clusters on ImageNet, + PaCa head (seed file name
# upernet_*, PaCa head model). Seed table: 23.2M, 47.2 GFLOPs, 48.1 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_49_100_downstream',
        downstream_cluster_num=[200, 200, 200, 200]))
