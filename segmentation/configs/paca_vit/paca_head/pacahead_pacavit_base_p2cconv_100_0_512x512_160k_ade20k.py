# PaCa-Base (conv) + PaCa head. Seed table: 48.0M params, 68.5 GFLOPs, 50.39 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_base_p2cconv_100_0_downstream',
        drop_path_rate=0.5),
    decode_head=dict(in_channels=[96, 192, 384, 512]))
