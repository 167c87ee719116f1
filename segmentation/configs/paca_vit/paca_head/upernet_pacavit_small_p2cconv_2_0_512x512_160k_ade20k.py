# Ablation: PaCa-Small, stage-wise [2,2,2,0] clusters on ImageNet, + PaCa head (the seed names
# the file upernet_*, but the model uses the PaCa head). Seed table: 23.2M, 47.2 GFLOPs, 47.7 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_2_0_downstream'))
