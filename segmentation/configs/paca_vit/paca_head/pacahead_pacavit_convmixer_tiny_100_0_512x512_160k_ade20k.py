# PaCa-Tiny with the ConvMixer clustering teacher + PaCa head. Not in the seed tables (no
# released ImageNet or ADE20K checkpoint): the backbone starts from scratch unless given one.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_convmixer_tiny_100_downstream',
        downstream_cluster_num=[200, 200, 200, 200],
        init_cfg=None))
# lr x10 for the teacher's clustering output layers too
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'paca_teacher.to_clusters': dict(lr_mult=10.0)}))
