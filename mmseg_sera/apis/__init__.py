from .config import build_model, load_config, load_run_config
from .inference import (DEFAULT_DATASET_META, build_inference_pipeline,
                        inference_model, init_model, show_refer_result)

__all__ = [
    'build_model', 'load_config', 'load_run_config', 'init_model',
    'inference_model', 'show_refer_result', 'build_inference_pipeline',
    'DEFAULT_DATASET_META'
]
