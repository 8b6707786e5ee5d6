"""Config loading shared by the tools and the inference API."""
import os.path as osp
from typing import Optional

from mmengine.config import Config
from mmengine.registry import init_default_scope
from torch import nn


def load_run_config(config_path: str, cfg_options: Optional[dict],
                    launcher: str, work_dir: Optional[str]) -> Config:
    """What ``tools/train.py`` and ``tools/test.py`` share: load the config,
    set the launcher and the work dir (command line > config >
    ``./work_dirs/<config name>``) and, for distributed runs, adapt the
    settings to the machine (:func:`mmseg_sera.engine.adapt_dist_cfg`);
    without CUDA, choose threads and dataloader workers from the machine
    (:func:`mmseg_sera.engine.apply_cpu_plan`); checkpoints are written
    atomically (:func:`mmseg_sera.engine.use_atomic_checkpoints`)."""
    from ..engine import (adapt_dist_cfg, apply_cpu_plan,
                          use_atomic_checkpoints)
    cfg = load_config(config_path, cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join(
            './work_dirs',
            osp.splitext(osp.basename(str(config_path)))[0])
    if launcher != 'none':
        adapt_dist_cfg(cfg)
    apply_cpu_plan(cfg)
    use_atomic_checkpoints(cfg)
    return cfg


def load_config(config, cfg_options: Optional[dict] = None) -> Config:
    """Load a config file (or pass a :class:`Config` through) and merge
    ``--cfg-options`` style overrides.

    Importing this module registers every mmseg_sera component, so configs
    work even where ``custom_imports`` is missing.

    Raises:
        FileNotFoundError: ``config`` is a path that does not exist.
    """
    if isinstance(config, (str, bytes)) or hasattr(config, '__fspath__'):
        path = osp.expanduser(str(config))
        if not osp.isfile(path):
            raise FileNotFoundError(f'config file not found: {path}')
        config = Config.fromfile(path)
    elif not isinstance(config, Config):
        raise TypeError('config must be a file path or an mmengine Config, '
                        f'got {type(config).__name__}')
    if cfg_options:
        config.merge_from_dict(cfg_options)
    return config


def build_model(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` in the config's default scope (``'mmseg'``), with
    the constructors' random weights: ``init_weights`` is not called, so no
    checkpoint named in the config is read."""
    from mmseg.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    return MODELS.build(cfg.model)
