# PaCa-Tiny with the ConvMixer clustering teacher + PaCa head. Not in the seed tables (no
# released ImageNet or ADE20K checkpoint): the backbone starts from scratch unless given one.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_convmixer_tiny_100_downstream',
        downstream_cluster_num=[200, 200, 200, 200],
        init_cfg=None))
