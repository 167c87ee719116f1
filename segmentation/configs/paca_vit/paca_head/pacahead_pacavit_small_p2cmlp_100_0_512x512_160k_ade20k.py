# PaCa-Small (mlp clustering) + PaCa head. Seed table: 24.0M params, 50.0 GFLOPs, 48.2 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

import models  # noqa: E402  (after _base_, which mmengine needs first)

pacavit = 'pacavit_small_p2cmlp_100_0'
model = dict(
    backbone=dict(
        type=f'{pacavit}_downstream',
        init_cfg=dict(type='Pretrained', checkpoint=models.checkpoint.release_url(
            models.paca_vit.RELEASED_IMAGENET[pacavit]))))
# lr x10 for the mlp clustering output layer too
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'clustering.clustering.2': dict(lr_mult=10.0)}))
