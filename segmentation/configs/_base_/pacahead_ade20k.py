# PaCa-ViT backbone + PaCa segmentation head on ADE20K.  The head and the backbone's conv-clustering
# output layers (new: 200 clusters instead of ImageNet's 100) learn at 10x the base lr.  Variant
# configs in paca_vit/paca_head/ name the backbone.
_base_ = 'ade20k_160k_adamw.py'

crop_size = (512, 512)
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='PaCaEncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=crop_size),
    pretrained=None,
    backbone=dict(
        type='pacavit_tiny_p2cconv_100_0_downstream',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        layer_scale=None,
        downstream_cluster_num=[200, 200, 200, 0],
        # the variant's released ImageNet-1k weights (models/paca_vit.py: RELEASED_IMAGENET)
        init_cfg=dict(type='Pretrained', checkpoint='pretrained')),
    decode_head=dict(
        type='PaCaSegHead',
        in_channels=[96, 192, 320, 384],
        in_index=[0, 1, 2, 3],
        channels=256,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, avg_non_ignore=True, loss_weight=1.0),
        aux_loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, avg_non_ignore=True, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# The official recipe: no decay on norm layers, lr x10 for the head and for the cluster output
# layers of conv clustering only.  Its key 'clustering.4' matches no mlp or ConvMixer-teacher
# parameter, so those rows train their output layers at 1x; cluster_output.kinds (conv, mlp,
# linear, teacher) widens it.  The layers are found by module (mmseg_custom/optim_constructor.py).
optim_wrapper = dict(
    constructor='ClusterOutputOptimWrapperConstructor',
    paramwise_cfg=dict(
        custom_keys={
            'norm': dict(decay_mult=0.0),
            'head': dict(lr_mult=10.0),
        },
        cluster_output=dict(lr_mult=10.0, kinds=['conv'])))
