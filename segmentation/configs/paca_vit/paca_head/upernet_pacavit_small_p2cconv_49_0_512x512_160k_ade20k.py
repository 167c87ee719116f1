# Ablation: PaCa-Small, stage-wise [49,49,49,0] clusters on ImageNet, + PaCa head (seed file name
# upernet_*, PaCa head model). Seed table: 23.4M, 47.3 GFLOPs, 47.8 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

import models  # noqa: E402  (after _base_, which mmengine needs first)

pacavit = 'pacavit_small_p2cconv_49_0'
model = dict(
    backbone=dict(
        type=f'{pacavit}_downstream',
        init_cfg=dict(type='Pretrained', checkpoint=models.checkpoint.release_url(
            models.paca_vit.RELEASED_IMAGENET[pacavit]))))
