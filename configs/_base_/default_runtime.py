# Runtime shared by every mmseg_sera config.
default_scope = 'mmseg'
custom_imports = dict(imports=['mmseg_sera'], allow_failed_imports=False)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # tools/train.py switches to gloo where CUDA is absent.
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='ReferSegVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
# Sparse Top-K routing leaves unrouted experts without gradients in a step.
find_unused_parameters = True
tta_model = None
# RNGStateHook restores the random generators on --resume so that a resumed
# run reproduces the uninterrupted one.  ExpertUtilisationHook logs, per
# routed module and expert, the share of samples it weighs most
# (util_<module>_<expert>) and warns when an expert collapses.
custom_hooks = [
    dict(type='RNGStateHook'),
    dict(type='ExpertUtilisationHook')
]
