# PaCa-Tiny (conv) + UperNet. Seed table: 41.6M params, 229.9 GFLOPs, 44.49 mIoU.
_base_ = '../../_base_/upernet_ade20k.py'

import models  # noqa: E402  (after _base_, which mmengine needs first)

pacavit = 'pacavit_tiny_p2cconv_100_0'
model = dict(
    backbone=dict(
        type=f'{pacavit}_downstream',
        init_cfg=dict(type='Pretrained', checkpoint=models.checkpoint.release_url(
            models.paca_vit.RELEASED_IMAGENET[pacavit]))))
