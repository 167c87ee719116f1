# PaCa-Small (ConvMixer clustering teacher) + PaCa head. Seed table: 22.2M params, 46.4 GFLOPs,
# 46.2 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

import models  # noqa: E402  (after _base_, which mmengine needs first)

pacavit = 'pacavit_convmixer_small_100'
model = dict(
    backbone=dict(
        type=f'{pacavit}_downstream',
        downstream_cluster_num=[200, 200, 200, 200],
        init_cfg=dict(type='Pretrained', checkpoint=models.checkpoint.release_url(
            models.paca_vit.RELEASED_IMAGENET[pacavit]))))
# lr x10 for the teacher's clustering output layers too
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'paca_teacher.to_clusters': dict(lr_mult=10.0)}))
