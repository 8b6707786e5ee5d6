"""Config loading shared by the tools and the inference API."""
import os.path as osp
from typing import Optional

from mmengine.config import Config


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
