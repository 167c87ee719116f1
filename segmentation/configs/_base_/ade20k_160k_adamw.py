# What every PaCa-ViT ADE20K config shares: mmseg's ADE20K data (512x512 crops), runtime and 160k
# schedule, with AdamW (lr 6e-5, weight decay 0.01 on every parameter, as the official UperNet
# configs; the PaCa-head configs add their paramwise keys), a 1500-iteration linear
# warm-up then poly decay, and 2 images per GPU (16 on 8 GPUs).
_base_ = [
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]

import os  # noqa: E402  (after _base_: mmengine reads a config with imports first as a lazy config)

# registers the pacavit_*_downstream backbones, PaCaSegHead and PaCaEncoderDecoder
custom_imports = dict(imports=['mmseg_custom'], allow_failed_imports=False)

# <repo>/datasets/ADEChallengeData2016, whatever the working directory; $PACAVIT_DATASETS replaces
# <repo>/datasets
data_root = os.path.join(
    os.environ.get('PACAVIT_DATASETS') or os.path.normpath('{{fileDirname}}/../../../datasets'),
    'ADEChallengeData2016')
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=1500, end=160000),
]
# --auto-scale-lr scales lr by (GPUs x batch_size) / 16, the official setting's 8 GPUs x 2 images
auto_scale_lr = dict(enable=False, base_batch_size=16)
