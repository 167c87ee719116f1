# PaCa-Tiny (conv) + PaCa head. Seed table: 13.3M params, 34.4 GFLOPs, 45.65 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_tiny_p2cconv_100_0_downstream'))
