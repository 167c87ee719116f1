# Ablation: PaCa-Small, stage-wise [100,100,100,100] clusters on ImageNet, + PaCa head (seed file
# name upernet_*, PaCa head model). Seed table: 23.4M, 47.3 GFLOPs, 48.3 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

import models  # noqa: E402  (after _base_, which mmengine needs first)

pacavit = 'pacavit_small_p2cconv_100'
model = dict(
    backbone=dict(
        type=f'{pacavit}_downstream',
        downstream_cluster_num=[200, 200, 200, 200],
        init_cfg=dict(type='Pretrained', checkpoint=models.checkpoint.release_url(
            models.paca_vit.RELEASED_IMAGENET[pacavit]))))
