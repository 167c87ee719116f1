# PaCa-Base (conv) + UperNet. Seed table: 77.2M params, 264.1 GFLOPs, 49.67 mIoU.
_base_ = '../../_base_/upernet_ade20k.py'

import models  # noqa: E402  (after _base_, which mmengine needs first)

pacavit = 'pacavit_base_p2cconv_100_0'
model = dict(
    backbone=dict(
        type=f'{pacavit}_downstream',
        init_cfg=dict(type='Pretrained', checkpoint=models.checkpoint.release_url(
            models.paca_vit.RELEASED_IMAGENET[pacavit]))),
    decode_head=dict(in_channels=[96, 192, 384, 512]),
    auxiliary_head=dict(in_channels=384))
