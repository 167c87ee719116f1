# Mask R-CNN + FPN with a PaCa-ViT backbone (drop path 0.1 for every variant, as the official
# configs).  Variant configs set the backbone type and the FPN input channels when they differ.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'

# registers the pacavit_*_downstream backbones (detection/mmdet_custom)
custom_imports = dict(imports=['mmdet_custom'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='pacavit_tiny_p2cconv_100_0_downstream',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        layer_scale=None,
        # the variant's released ImageNet-1k weights (models/paca_vit.py: RELEASED_IMAGENET)
        init_cfg=dict(type='Pretrained', checkpoint='pretrained')),
    neck=dict(in_channels=[96, 192, 320, 384]))
