# PaCa-Base (conv) + UperNet. Seed table: 77.2M params, 264.1 GFLOPs, 49.67 mIoU.
_base_ = '../../_base_/upernet_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_base_p2cconv_100_0_downstream'),
    decode_head=dict(in_channels=[96, 192, 384, 512]),
    auxiliary_head=dict(in_channels=384))
