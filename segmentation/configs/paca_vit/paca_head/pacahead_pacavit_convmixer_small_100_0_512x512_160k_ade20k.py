# PaCa-Small (ConvMixer clustering teacher) + PaCa head. Seed table: 22.2M params, 46.4 GFLOPs,
# 46.2 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_convmixer_small_100_downstream',
        downstream_cluster_num=[200, 200, 200, 200]))
