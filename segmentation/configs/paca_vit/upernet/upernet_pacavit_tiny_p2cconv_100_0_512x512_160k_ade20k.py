# PaCa-Tiny (conv) + UperNet. Seed table: 41.6M params, 229.9 GFLOPs, 44.49 mIoU.
_base_ = '../../_base_/upernet_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_tiny_p2cconv_100_0_downstream'))
