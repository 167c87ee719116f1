# PaCa-Base (ConvMixer clustering teacher) + PaCa head. Seed table: 48.8M params, 68.7 GFLOPs,
# 48.4 mIoU.
_base_ = '../../_base_/pacahead_ade20k.py'

model = dict(
    backbone=dict(
        type='pacavit_convmixer_base_100_downstream',
        drop_path_rate=0.5,
        downstream_cluster_num=[200, 200, 200, 200]),
    decode_head=dict(in_channels=[96, 192, 384, 512]))
