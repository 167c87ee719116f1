# Ablation: PaCa-Small, block-wise [100,100,100,100] clusters on ImageNet, + PaCa head (seed file
# name upernet_*, PaCa head model). Seed table: 25.8M, 50.9 GFLOPs, 48.0 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_100_blockwise_downstream',
        downstream_cluster_num=[200, 200, 200, 200]))
