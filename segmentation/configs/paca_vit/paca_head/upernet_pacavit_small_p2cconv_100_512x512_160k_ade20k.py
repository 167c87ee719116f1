# Ablation: PaCa-Small, stage-wise [100,100,100,100] clusters on ImageNet, + PaCa head (seed file
# name upernet_*, PaCa head model). Seed table: 23.4M, 47.3 GFLOPs, 48.3 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_100_downstream',
        downstream_cluster_num=[200, 200, 200, 200]))
