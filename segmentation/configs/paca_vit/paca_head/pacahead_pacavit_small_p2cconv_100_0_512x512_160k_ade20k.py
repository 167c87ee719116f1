# PaCa-Small (conv) + PaCa head. Seed table: 23.2M params, 47.2 GFLOPs, 48.3 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_100_0_downstream'))
