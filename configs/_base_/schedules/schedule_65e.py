# DETRIS setting: Adam, lr 1e-4, no weight decay, x0.1 at epochs 35 and 55
# of 65.  Hooks and loops as schedule_50e.py.
_base_ = ['./schedule_50e.py']
max_epochs = 65
param_scheduler = [
    dict(type='MultiStepLR', by_epoch=True, begin=0, end=max_epochs,
         milestones=[35, 55], gamma=0.1)
]
train_cfg = dict(max_epochs=max_epochs)
