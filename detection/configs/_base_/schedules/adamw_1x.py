# The 1x schedule (12 epochs, steps at 8 and 11) with AdamW, lr 1e-4, weight decay 0.05 and none
# on parameters named *norm* (the official key: the ConvMixer teacher's BatchNorms, named by index,
# keep their decay).
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.0)}))
