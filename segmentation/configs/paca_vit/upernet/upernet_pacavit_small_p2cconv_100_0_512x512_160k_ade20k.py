# PaCa-Small (conv) + UperNet. Seed table: 51.4M params, 242.7 GFLOPs, 47.6 mIoU.
_base_ = '../../_base_/upernet_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_small_p2cconv_100_0_downstream'))
