# PaCa-ViT backbone + UperNet (UPerHead on the four stages, FCN auxiliary head on stage 3) on
# ADE20K, mmseg's Swin UperNet with the backbone swapped.  Variant configs in paca_vit/upernet/
# name the backbone and the head input channels.
_base_ = ['mmseg::_base_/models/upernet_swin.py', 'ade20k_160k_adamw.py']

crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='pacavit_tiny_p2cconv_100_0_downstream',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        layer_scale=None,
        downstream_cluster_num=[200, 200, 200, 0],
        # the variant's released ImageNet-1k weights (models/paca_vit.py: RELEASED_IMAGENET)
        init_cfg=dict(type='Pretrained', checkpoint='pretrained')),
    decode_head=dict(in_channels=[96, 192, 320, 384], num_classes=150),
    auxiliary_head=dict(in_channels=320, num_classes=150))
