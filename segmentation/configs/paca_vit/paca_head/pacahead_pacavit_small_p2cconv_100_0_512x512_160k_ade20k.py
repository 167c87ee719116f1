# PaCa-Small (conv) + PaCa head. Seed table: 23.2M params, 47.2 GFLOPs, 48.3 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

import models  # noqa: E402  (after _base_, which mmengine needs first)

pacavit = 'pacavit_small_p2cconv_100_0'
model = dict(
    backbone=dict(
        type=f'{pacavit}_downstream',
        init_cfg=dict(type='Pretrained', checkpoint=models.checkpoint.release_url(
            models.paca_vit.RELEASED_IMAGENET[pacavit]))))
