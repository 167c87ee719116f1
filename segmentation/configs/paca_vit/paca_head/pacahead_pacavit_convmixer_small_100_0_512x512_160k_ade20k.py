# PaCa-Small (ConvMixer clustering teacher) + PaCa head. Seed table: 22.2M params, 46.4 GFLOPs,
# 46.2 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_convmixer_small_100_downstream',
        downstream_cluster_num=[200, 200, 200, 200]))
# lr x10 for the teacher's clustering output layers too
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'paca_teacher.to_clusters': dict(lr_mult=10.0)}))
