# PaCa-Small (conv) + UperNet. Seed table: 51.4M params, 242.7 GFLOPs, 47.6 mIoU.
_base_ = '../../_base_/upernet_ade20k.py'

import models  # noqa: E402  (after _base_, which mmengine needs first)

pacavit = 'pacavit_small_p2cconv_100_0'
model = dict(
    backbone=dict(
        type=f'{pacavit}_downstream',
        init_cfg=dict(type='Pretrained', checkpoint=models.checkpoint.release_url(
            models.paca_vit.RELEASED_IMAGENET[pacavit]))))
