"""mmseg_sera: referring image segmentation for MMSegmentation.

Importing the package registers every component in mmseg's registries
(``MODELS``, ``DATASETS``, ``TRANSFORMS``, ``METRICS``, ``VISUALIZERS``,
``HOOKS``), so a config only needs::

    custom_imports = dict(imports=['mmseg_sera'], allow_failed_imports=False)
"""
from . import engine  # noqa: F401  (torch/mmengine compatibility first)
from . import apis, datasets, evaluation, models, visualization  # noqa: F401,E501
from .version import __version__, version_info

__all__ = ['__version__', 'version_info']
