# PaCa-Small (mlp clustering) + PaCa head. Seed table: 24.0M params, 50.0 GFLOPs, 48.2 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cmlp_100_0_downstream'))
