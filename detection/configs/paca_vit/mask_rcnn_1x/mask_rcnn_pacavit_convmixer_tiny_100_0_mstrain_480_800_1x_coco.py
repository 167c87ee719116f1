# PaCa-Tiny with a ConvMixer clustering teacher, M=100 in every stage.
# no ImageNet checkpoint of this backbone was released. The seed publishes its "PaCa-Small (teacher)" COCO
# weights (40.9M params) under this name; that size fits the Small teacher (see the README).
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_convmixer_tiny_100_downstream',
        drop_path_rate=0.1,
        init_cfg=None))
