# PaCa-Tiny (conv) + PaCa head. Seed table: 13.3M params, 34.4 GFLOPs, 45.65 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

import models  # noqa: E402  (after _base_, which mmengine needs first)

pacavit = 'pacavit_tiny_p2cconv_100_0'
model = dict(
    backbone=dict(
        type=f'{pacavit}_downstream',
        init_cfg=dict(type='Pretrained', checkpoint=models.checkpoint.release_url(
            models.paca_vit.RELEASED_IMAGENET[pacavit]))))
