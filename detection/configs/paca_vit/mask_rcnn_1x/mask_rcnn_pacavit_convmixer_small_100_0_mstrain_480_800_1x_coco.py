# PaCa-Small with a ConvMixer clustering teacher, M=100 in every stage.
# seed ("PaCa-Small (teacher)", released as ..._convmixer_tiny_100_0_...): 40.9M params, 292 GFLOPs,
# box AP 45.8, mask AP 41.4.
_base_ = '../../_base_/mask_rcnn_pacavit_fpn_mstrain_480_800_1x_coco.py'

model = dict(
    backbone=dict(
        type='pacavit_convmixer_small_100_downstream'))
